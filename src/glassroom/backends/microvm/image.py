"""The guest kernel, initramfs and read-only root image, built once and cached.

* **Kernel**, by ``GLASSROOM_MICROVM_KERNEL``:
  - unset: the purpose-built kernel (``kernel.py``) when ``glassroom microvm
    prepare`` has built it, else Debian's stock kernel;
  - ``built``: the purpose-built kernel only (missing: refuse, exit 125);
  - ``stock``: Debian's ``linux-image-cloud-amd64``, fetched with ``apt-get
    download`` and unpacked with ``dpkg-deb -x`` into the cache (the host's
    own boot is never touched);
  - a path: that vmlinuz (its modules, if any, in ``GLASSROOM_MICROVM_MODULES``),
    booted like the stock one.
* **Direct boot** (the built kernel): no initramfs; the kernel mounts the
  root image read-only from ``/dev/vda`` and runs ``/.glassroom/init``.
* **Initramfs** (the stock kernel; uncompressed newc cpio, ~2.6 MB): static
  busybox, the virtio modules the cloud kernel lacks built in, and a
  20-line ``/init`` that mounts the root image read-only and
  ``switch_root``s to ``/.glassroom/init``.
* **Root image** (ext4 via ``mke2fs -d``, no journal, read-only): the
  host's python3 and stdlib, coreutils, dash, bash, grep, sed, findutils,
  diffutils, git, curl, ncurses' tools and their shared libraries,
  terminfo, ``/etc/ssl/certs``, and the agent (with ``landlock.py`` and
  ``tracer.py``, copied from ``_sys``), and beside it the compiled agent
  (``/.glassroom/guest-agent``, static) when ``glassroom init build`` has
  built it: its sources' digest is part of the image's key.
  Tools are copied from the host at the same paths, so the plan's tool
  paths mean the same inside.  Next to it, ``rootfs-<id>.files.json``
  lists what the image holds: a sandbox whose plan names a tool the image
  lacks is refused before QEMU starts (:func:`check_tools`), never started
  with a Landlock rule that cannot be built.

The cache lives in ``GLASSROOM_MICROVM_CACHE``, or ``/var/cache/glassroom/
microvm`` as root.  Everything is keyed by content: a changed agent or
kernel gives a new image id, and snapshots are per image id.  The host's
installed versions of :data:`TOOL_PACKAGES` are part of the root image's key
too (the image copies the host's files): installing or upgrading one of them
builds a new image rather than leaving the old one short of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..._errors import BackendUnavailable, PlanError
from ...plan import LaunchPlan

#: Modules the cloud kernel needs, in load order (see issue 6).
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "failover",
    "net_failover",
    "virtio_net",
)
KERNEL_PACKAGE = "linux-image-cloud-amd64"
#: Debian packages whose executables go into the image (plus their libraries).
TOOL_PACKAGES = (
    "coreutils", "dash", "bash", "grep", "sed", "findutils", "diffutils", "gzip", "tar",
    "hostname", "python3.11-minimal", "python3-minimal",
    # E2B's base template has these (its SDK's git API; curl in its examples;
    # tput, which a terminal asks for its size).
    "git", "curl", "ncurses-bin",
)  # fmt: skip
#: Copied without their package: the drill's "not allowed" tool, the OS identity,
#: and git's own copy of itself and its daemon (git runs its subcommands'
#: helpers from /usr/lib/git-core: ``git clone`` starts ``git upload-pack``).
EXTRA_FILES = ("/usr/bin/perl", "/usr/lib/os-release", "/etc/os-release", "/etc/debian_version",
               "/usr/lib/git-core/git", "/usr/lib/git-core/git-daemon")  # fmt: skip
#: Data trees copied whole where the host has them: ``git init``'s templates
#: (without them it warns on every init), and the terminal descriptions of
#: ncurses-base (``tput`` and every curses program read them).
EXTRA_TREES = ("/usr/share/git-core/templates", "/lib/terminfo", "/usr/share/terminfo")
#: Where dpkg records each installed package's file list (its mtime changes
#: when the package is installed or upgraded).
DPKG_INFO = "/var/lib/dpkg/info"
#: The manifest's format; a manifest of another version is not trusted.
MANIFEST_VERSION = 1
#: Symlinks followed when resolving a path in the manifest (the kernel's own bound).
MAX_LINK_HOPS = 40
PYTHON_LIB = "/usr/lib/python3.11"
PYTHON_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
               "unittest", "distutils", "config-3.11-x86_64-linux-gnu", "site-packages",
               "dist-packages", "venv", "turtle.py"}  # fmt: skip
GUEST_FILES = ("agent.py", "protocol.py", "cjson.py")
#: From ``_sys``: the Landlock wrapper, and the ptrace tracer of the file audit.
SYS_FILES = ("landlock.py", "tracer.py")
#: The compiled guest agent (``_sys/agent``, ``--guest``) in ``/.glassroom``,
#: beside the Python one, when ``glassroom init build`` has built it.
GUEST_AGENT = "guest-agent"
#: Mount points the read-only root must already have.
GUEST_DIRS = (
    "dev",
    "proc",
    "sys",
    "run",
    "tmp",
    "workspace",
    "sys/fs/cgroup",
    ".glassroom",
)

INIT_SCRIPT = """#!/bin/busybox sh
export PATH=/bin
B=/bin/busybox
$B mount -t devtmpfs dev /dev
$B mount -t proc proc /proc
args=""
for a in $($B cat /proc/cmdline); do
  case "$a" in virtio_mmio.device=*) args="$args device=${a#virtio_mmio.device=}";; esac
done
for m in virtio_ring virtio virtio_mmio virtio_blk virtio_console \\
         failover net_failover virtio_net; do
  if [ -f /m/$m.ko ]; then
    if [ $m = virtio_mmio ]; then $B insmod /m/$m.ko $args; else $B insmod /m/$m.ko; fi
  fi
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 500 ]; do $B usleep 10000; i=$((i+1)); done
$B mount -t ext4 -o ro,noatime /dev/vda /newroot || $B poweroff -f
$B mount --move /dev /newroot/dev
$B umount /proc
# glassroom_init: the kernel passes an unknown name=value to init as its
# environment (qemu.cmdline sets it for the compiled guest agent).
exec $B switch_root /newroot /.glassroom/${glassroom_init:-init}
"""

#: pid 1 of the guest: a launcher, so that the agent itself loads from its
#: compiled ``.pyc`` (a script named on the command line is compiled from
#: source at every start: ~0.1 s under TCG), and ``json`` is the light
#: ``cjson.py`` (see there).  ``-ISB`` is one shebang word.
AGENT_INIT = """#!/usr/bin/python3 -ISB
import sys
sys.path.insert(0, "/.glassroom")
try:
    import cjson
    sys.modules["json"] = cjson
except ImportError:  # no C codec (not CPython): the real json
    pass
import agent
agent.main()
"""


@dataclass(frozen=True)
class Image:
    kernel: Path
    #: None: direct boot (the purpose-built kernel mounts the root image itself).
    initrd: Path | None
    rootfs: Path
    image_id: str
    kernel_release: str
    #: The root image holds the compiled guest agent (:data:`GUEST_AGENT`).
    compiled: bool = False
    #: Which agent a VM of this image boots: "compiled" or "python" (chosen
    #: per sandbox, ``_instance.choose_agent``; part of the snapshot's name).
    agent: str = "python"

    @property
    def direct(self) -> bool:
        return self.initrd is None

    @property
    def manifest(self) -> Path:
        """What the root image holds (:func:`check_tools` reads it)."""
        return _manifest_path(self.rootfs)

    def sizes(self) -> dict[str, int]:
        return {
            "kernel_bytes": self.kernel.stat().st_size,
            "initrd_bytes": self.initrd.stat().st_size if self.initrd else 0,
            "rootfs_bytes": self.rootfs.stat().st_size,
        }


def cache_dir() -> Path:
    env = os.environ.get("GLASSROOM_MICROVM_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/glassroom/microvm")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "glassroom" / "microvm"


def _unavailable(what: str) -> BackendUnavailable:
    return BackendUnavailable(f"microvm: {what}", rule="backend.microvm")


def _guest_sources() -> list[Path]:
    """The agent and the stdlib-only host modules it imports (copied as they are)."""
    here = Path(__file__).resolve().parent.parent.parent
    return [here / "guest" / n for n in GUEST_FILES] + [here / "_sys" / n for n in SYS_FILES]


def compiled_agent() -> Path | None:
    """The compiled agent built from the current sources (``glassroom init build``), or None."""
    from ... import _config
    from ..._sys import agent_build

    return agent_build.find(_config.state_dir())


def agent_key(binary: Path | None) -> bytes:
    """What an image's key takes of the compiled agent: its sources' digest, or none."""
    from ..._sys import agent_build

    return f"guest-agent:{agent_build.source_digest() if binary else 'none'}".encode()


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:16]


# -- kernel ---------------------------------------------------------------------


KERNEL_ENV = "GLASSROOM_MICROVM_KERNEL"


def kernel_choice() -> str:
    """``auto`` | ``built`` | ``stock`` | ``path`` (what ``GLASSROOM_MICROVM_KERNEL`` says)."""
    v = os.environ.get(KERNEL_ENV, "")
    if v in ("", "auto"):
        return "auto"
    if v in ("built", "stock"):
        return v
    return "path"


def _kernel(
    cache: Path, fetch: bool, choice: str | None = None
) -> tuple[Path, Path | None, str, bool]:
    """(vmlinuz, modules dir or None, release, direct boot)."""
    choice = choice or kernel_choice()
    if choice in ("auto", "built"):
        from . import kernel

        built = kernel.find(cache)
        if built is not None:
            return built.vmlinux, None, built.release, True
        if choice == "built":
            raise _unavailable(f"{KERNEL_ENV}=built but no guest kernel is built; "
                               "run `glassroom microvm prepare`")  # fmt: skip
    if choice == "path":
        user = os.environ[KERNEL_ENV]
        k = Path(user)
        if not k.is_file():
            raise _unavailable(f"GLASSROOM_MICROVM_KERNEL={user} does not exist")
        mods = os.environ.get("GLASSROOM_MICROVM_MODULES")
        return k, Path(mods) if mods else None, k.name.removeprefix("vmlinuz-"), False
    vmlinuz = stock_kernel(cache)
    if vmlinuz is None:
        if not fetch:
            raise _unavailable("no guest kernel prepared; run `glassroom microvm prepare`")
        vmlinuz = fetch_stock(cache)
    release = vmlinuz.name.removeprefix("vmlinuz-")
    mod_dir = cache / "kernel" / "lib" / "modules" / release
    return vmlinuz, mod_dir if mod_dir.is_dir() else None, release, False


def stock_kernel(cache: Path) -> Path | None:
    """Debian's stock vmlinuz in the cache, if fetched."""
    found = sorted((cache / "kernel").glob("boot/vmlinuz-*"))
    return found[-1] if found else None


def fetch_stock(cache: Path) -> Path:
    """Fetch Debian's stock kernel if missing (``microvm prepare`` keeps it as
    the fallback, so that booting it never needs the network later)."""
    have = stock_kernel(cache)
    if have is not None:
        return have
    _fetch_kernel(cache / "kernel")
    have = stock_kernel(cache)
    if have is None:
        raise _unavailable("the kernel package held no /boot/vmlinuz-*")
    return have


def _fetch_kernel(kdir: Path) -> None:
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise _unavailable("apt-get/dpkg-deb missing: set GLASSROOM_MICROVM_KERNEL to a vmlinuz")
    dl = kdir.parent / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    dep = subprocess.run(["apt-cache", "depends", KERNEL_PACKAGE], capture_output=True,
                         text=True, check=False).stdout  # fmt: skip
    pkgs = [ln.split(":", 1)[1].strip() for ln in dep.splitlines()
            if ln.strip().startswith("Depends:") and "linux-image-" in ln]  # fmt: skip
    if not pkgs:
        raise _unavailable(f"apt-cache knows no {KERNEL_PACKAGE} (apt-get update?)")
    debs = sorted(dl.glob(f"{pkgs[0]}_*.deb"))
    if not debs:
        r = subprocess.run(["apt-get", "download", "-q", pkgs[0]], cwd=dl, capture_output=True,
                           text=True, check=False)  # fmt: skip
        debs = sorted(dl.glob(f"{pkgs[0]}_*.deb"))
        if not debs:
            raise _unavailable(f"apt-get download {pkgs[0]} failed: {r.stderr.strip()[-200:]}")
    tmp = Path(tempfile.mkdtemp(dir=kdir.parent, prefix=".kernel-"))
    try:
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(tmp)], check=True)
        if kdir.exists():
            shutil.rmtree(kdir)
        os.replace(tmp, kdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- initramfs --------------------------------------------------------------------


def _cpio(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """newc archive of (name, mode, data, rdev) entries."""
    out = bytearray()
    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)], 1):
        nb = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF, len(nb), 0)
        hdr = "070701" + "".join(f"{v:08X}" for v in fields)
        out += hdr.encode() + nb
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def _build_initrd(mods: Path | None, dest: Path) -> None:
    busybox = shutil.which("busybox")
    if not busybox:
        raise _unavailable("busybox is missing: apt-get install busybox-static")
    if subprocess.run(["ldd", busybox], capture_output=True, check=False).returncode == 0:
        raise _unavailable(f"{busybox} is dynamically linked: apt-get install busybox-static")
    entries: list[tuple[str, int, bytes, int]] = [
        (d, 0o040755, b"", 0) for d in ("bin", "dev", "proc", "sys", "newroot", "m")
    ]
    entries.append(("dev/console", 0o020600, b"", (5 << 8) | 1))
    entries.append(("bin/busybox", 0o100755, Path(busybox).read_bytes(), 0))
    entries.append(("bin/sh", 0o120777, b"busybox", 0))
    entries.append(("init", 0o100755, INIT_SCRIPT.encode(), 0))
    if mods is not None:
        for name in MODULES:
            found = list(mods.rglob(f"{name}.ko"))
            if found:
                entries.append((f"m/{name}.ko", 0o100644, found[0].read_bytes(), 0))
    tmp = dest.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(_cpio(entries))
    os.replace(tmp, dest)


# -- root image -------------------------------------------------------------------


def _pkg_files(pkg: str) -> list[str]:
    r = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True, check=False)
    return r.stdout.splitlines() if r.returncode == 0 else []


def _libs(paths: list[str]) -> set[str]:
    out: set[str] = set()
    for i in range(0, len(paths), 200):
        r = subprocess.run(["ldd", *paths[i : i + 200]], capture_output=True, text=True,
                           check=False)  # fmt: skip
        for line in r.stdout.splitlines():
            parts = line.split()
            for p in parts:
                if p.startswith("/") and os.path.exists(p):
                    out.add(p)
    return out


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _copy_into(root: Path, path: str) -> None:
    """Copy host ``path`` to the same place under ``root`` (dirs resolved on the host)."""
    real_dir = os.path.realpath(os.path.dirname(path))
    dest = root / real_dir.lstrip("/") / os.path.basename(path)
    if dest.exists() or dest.is_symlink():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    if os.path.islink(path):
        os.symlink(os.readlink(path), dest)
        target = os.path.realpath(path)
        if os.path.isfile(target):
            _copy_into(root, target)
    elif os.path.isfile(path):
        shutil.copy2(path, dest)


def _build_rootfs(dest: Path, binary: Path | None = None) -> None:
    mke2fs = shutil.which("mke2fs", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not mke2fs:
        raise _unavailable("mke2fs is missing: apt-get install e2fsprogs")
    stage = Path(tempfile.mkdtemp(prefix=".rootfs-", dir=dest.parent))
    try:
        files: list[str] = []
        for pkg in TOOL_PACKAGES:
            files += [f for f in _pkg_files(pkg) if f.startswith(("/usr/bin/", "/bin/"))]
        files += [f for f in EXTRA_FILES if os.path.exists(f)]
        for tree in EXTRA_TREES:
            for dirpath, _dirs, names in os.walk(tree):
                files += [os.path.join(dirpath, n) for n in names]
        for f in files:
            _copy_into(stage, f)
        for dirpath, dirnames, filenames in os.walk(PYTHON_LIB):
            rel = os.path.relpath(dirpath, PYTHON_LIB)
            if rel == ".":
                dirnames[:] = [d for d in dirnames if d not in PYTHON_SKIP]
                filenames = [f for f in filenames if f not in PYTHON_SKIP]
            for name in filenames:
                _copy_into(stage, os.path.join(dirpath, name))
        elves = [str(p) for p in stage.rglob("*") if p.is_file() and not p.is_symlink()
                 and _is_elf(str(p))]  # fmt: skip
        host_paths = ["/" + str(Path(p).relative_to(stage)) for p in elves]
        for lib in sorted(_libs(host_paths)):
            _copy_into(stage, lib)
        for name in ("bin", "sbin", "lib", "lib64"):
            if os.path.islink("/" + name):
                os.symlink(os.readlink("/" + name), stage / name)
        etc = stage / "etc"
        (etc / "ssl").mkdir(parents=True, exist_ok=True)
        if os.path.isdir("/etc/ssl/certs"):
            shutil.copytree("/etc/ssl/certs", etc / "ssl" / "certs", symlinks=False,
                            ignore_dangling_symlinks=True)  # fmt: skip
        (etc / "alternatives").mkdir(exist_ok=True)
        (etc / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n"
                                    "agent:x:1000:1000:agent:/workspace:/bin/sh\n")  # fmt: skip
        (etc / "group").write_text("root:x:0:\nagent:x:1000:\n")
        (etc / "hostname").write_text("sandbox\n")
        for d in GUEST_DIRS:
            (stage / d).mkdir(parents=True, exist_ok=True)
        # E2B's home, as on the other tiers (plan.HOME_LINK): a link into the scratch disk.
        (stage / "home").mkdir(exist_ok=True)
        os.symlink("/workspace", stage / "home" / "user")
        (stage / "run" / "glassroom" / "secrets").mkdir(parents=True, exist_ok=True)
        # The egress dir exists only when the VM has egress: a link into /run (tmpfs).
        os.symlink("/run/glassroom-net", stage / ".glassroom-net")
        for src in _guest_sources():
            shutil.copy2(src, stage / ".glassroom" / src.name)
        if binary is not None:
            shutil.copyfile(binary, stage / ".glassroom" / GUEST_AGENT)
            os.chmod(stage / ".glassroom" / GUEST_AGENT, 0o755)
        (stage / ".glassroom" / "init").write_text(AGENT_INIT)
        os.chmod(stage / ".glassroom" / "init", 0o755)
        subprocess.run(["/usr/bin/python3", "-I", "-m", "compileall", "-q",
                        str(stage / ".glassroom")], check=False,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        seal(stage, dest, mke2fs)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def seal(stage: Path, dest: Path, mke2fs: str) -> None:
    """``stage`` as a read-only ext4 image at ``dest``, with its manifest.

    The manifest goes first, so an image in place always has one."""
    used = sum(p.lstat().st_size for p in stage.rglob("*"))
    size_mib = used * 12 // 10 // (1 << 20) + 16
    tmp = dest.with_suffix(f".tmp{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    listed = _manifest_path(dest)
    listed_tmp = listed.with_suffix(f".tmp{os.getpid()}")
    listed_tmp.write_text(json.dumps(_manifest_of(stage)))
    os.replace(listed_tmp, listed)
    r = subprocess.run(
        [mke2fs, "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0", "-L",
         "glassroom", "-E", "root_owner=0:0", "-d", str(stage), str(tmp), f"{size_mib}M"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if r.returncode != 0:
        raise _unavailable(f"mke2fs failed: {r.stderr.strip()[-200:]}")
    os.chmod(tmp, 0o444)
    os.replace(tmp, dest)


def _manifest_path(rootfs: Path) -> Path:
    return rootfs.with_name(rootfs.name.removesuffix(".ext4") + ".files.json")


def _manifest_of(stage: Path) -> dict[str, object]:
    """Every regular file and symlink of the staged image, by its path inside."""
    files: list[str] = []
    links: dict[str, str] = {}
    for p in stage.rglob("*"):
        inside = "/" + str(p.relative_to(stage))
        if p.is_symlink():
            links[inside] = os.readlink(p)
        elif p.is_file():
            files.append(inside)
    return {"version": MANIFEST_VERSION, "files": sorted(files), "links": links}


#: Loaded manifests by path and mtime (read once per image, not per sandbox).
_MANIFESTS: dict[tuple[str, int], tuple[frozenset[str], dict[str, str]]] = {}


def _load_manifest(img: Image) -> tuple[frozenset[str], dict[str, str]]:
    path = img.manifest
    try:
        st = path.stat()
        key = (str(path), st.st_mtime_ns)
        held = _MANIFESTS.get(key)
        if held is None:
            data = json.loads(path.read_text())
            if data.get("version") != MANIFEST_VERSION:
                raise ValueError(f"version {data.get('version')!r}")
            files = frozenset(str(f) for f in data["files"])
            links = {str(k): str(v) for k, v in dict(data["links"]).items()}
            held = (files, links)
            if len(_MANIFESTS) >= 4:  # images of older recipes
                _MANIFESTS.clear()
            _MANIFESTS[key] = held
        return held
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        # No list, no start: what the image holds cannot be checked.
        raise _unavailable(f"{path.name} is unreadable ({exc}); run `glassroom microvm "
                           "prepare`") from None  # fmt: skip


def resolve_in_image(img: Image, path: str) -> str | None:
    """``path`` resolved inside the root image as the guest kernel would (its
    symlinks, not the host's), if it names a regular file there; else None."""
    files, links = _load_manifest(img)
    todo = [c for c in path.split("/") if c]
    done: list[str] = []
    hops = 0
    while todo:
        c = todo.pop(0)
        if c == ".":
            continue
        if c == "..":
            if done:
                done.pop()
            continue
        target = links.get("/" + "/".join([*done, c]))
        if target is None:
            done.append(c)
            continue
        hops += 1
        if hops > MAX_LINK_HOPS:
            return None
        if target.startswith("/"):
            done = []
        todo = [t for t in target.split("/") if t] + todo
    final = "/" + "/".join(done)
    return final if final in files else None


def check_tools(img: Image, plan: LaunchPlan) -> None:
    """Refuse a plan whose tools (or their loaders) the guest image does not hold.

    The plan resolves tools on the host; the guest can only run what was
    copied into its image.  A missing one would make the agent's Landlock
    rule for it fail, so no command at all could start: the sandbox must not
    start instead, with the rule that named the tool."""
    for tool in plan.tools:
        if resolve_in_image(img, tool.path) is None:
            raise PlanError(
                f"{tool.rule}: {tool.name} ({tool.path}) is not in the microvm guest image "
                f"(it holds the host's {', '.join(TOOL_PACKAGES)}); use a lower risk, or "
                "another tool",
                rule=tool.rule,
            )
    for loader in plan.loaders:
        if resolve_in_image(img, loader) is None:
            raise PlanError(f"tools.allow: the loader {loader} is not in the microvm guest "
                            "image", rule="tools.allow")  # fmt: skip


def _host_packages() -> bytes:
    """The installed state of :data:`TOOL_PACKAGES` (a few stats, no subprocess)."""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, "")
    out = []
    for pkg in TOOL_PACKAGES:
        for name in (f"{pkg}.list", f"{pkg}:{arch}.list"):
            try:
                st = os.stat(os.path.join(DPKG_INFO, name))
            except OSError:
                continue
            out.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(out).encode()


# -- entry point ---------------------------------------------------------------------


def prepare(fetch: bool = True, choice: str | None = None) -> Image:
    """Return the cached image, building what is missing or stale (one builder at a time).

    ``choice`` overrides ``GLASSROOM_MICROVM_KERNEL`` (``microvm prepare``
    builds the stock kernel's initramfs too, so the fallback boots as is)."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True, mode=0o755)
    with lock_file(cache / ".lock"):
        return _prepare(cache, fetch, choice)


@contextlib.contextmanager
def lock_file(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path``; read-only when the cache is not ours to
    write (glassroom as non-root using the root-prepared cache: flock works on
    a read-only fd, and anything missing then fails to build with its name)."""
    try:
        f = open(path, "a")  # noqa: SIM115
    except PermissionError:
        f = open(path)  # noqa: SIM115
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _prepare(cache: Path, fetch: bool, choice: str | None = None) -> Image:
    """Content-addressed: each kernel and each guest recipe has its own files, so
    supervisors of different versions never rebuild each other's images."""
    vmlinuz, mods, release, direct = _kernel(cache, fetch, choice)
    # The recipe (this file) is part of the key: a changed file list rebuilds.
    recipe = [p.read_bytes() for p in [*_guest_sources(), Path(__file__)]]
    binary = compiled_agent()
    guest = _digest(*recipe, _host_packages(), agent_key(binary))
    held = False  # the image holds the compiled agent though this caller has no build of it
    if binary is None:
        # A user who cannot read root's build still boots root's image of
        # these very sources, compiled agent and all, rather than need a new one.
        other = _digest(*recipe, _host_packages(), agent_key(Path(GUEST_AGENT)))
        rootfs_other = cache / f"rootfs-{other}.ext4"
        if rootfs_other.exists() and _manifest_path(rootfs_other).exists():
            guest, held = other, True
    kstat = vmlinuz.stat()
    kkey = _digest(f"{vmlinuz}:{kstat.st_size}:{kstat.st_mtime_ns}".encode(), INIT_SCRIPT.encode())
    initrd = None if direct else cache / f"initramfs-{kkey}.cpio"
    rootfs = cache / f"rootfs-{guest}.ext4"
    for path in (initrd, rootfs):
        # An image without its manifest (a build cut short) is built again.
        built = path is not None and path.exists()
        if path == rootfs and built:
            built = _manifest_path(rootfs).exists()
        if path is not None and not built:
            if not fetch:
                raise _unavailable(f"{path.name} is not built; run `glassroom microvm prepare`")
            if path != rootfs:
                _build_initrd(mods, path)
            else:
                _build_rootfs(rootfs, binary)
    return Image(vmlinuz, initrd, rootfs, _digest(kkey.encode(), guest.encode()), release,
                 compiled=binary is not None or held)  # fmt: skip


def prune(img: Image, keep: tuple[Path, ...] = ()) -> list[str]:
    """Remove images other than ``img``'s and ``keep`` (``microvm prepare`` only)."""
    gone = []
    kinds = ("initramfs-*.cpio", "rootfs-*.ext4", "rootfs-*.files.json")
    for old in [p for kind in kinds for p in cache_dir().glob(kind)]:
        if old not in (img.initrd, img.rootfs, img.manifest, *keep):
            with contextlib.suppress(OSError):
                old.unlink()
                gone.append(old.name)
    return gone
