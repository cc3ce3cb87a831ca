"""A microVM root image made from a template (``template = "NAME"``).

The guest's root disk is the template's tree plus what the guest needs to
run glassroom's agent, and nothing of the host besides:

- ``/.glassroom``: the agent (as in the default image) and a static busybox
  that is pid 1's launcher;
- ``/.glassroom-host/usr``: the host's python3, its standard library and
  the libraries it links, with the host's dynamic loader.  The agent runs on
  them, through that loader with ``--library-path`` (as the init does on the
  other tiers), so it needs nothing of the template's libc.  The agent gives
  commands no Landlock rule for it: a task can neither read nor run it;
- the guest's own mount points, ``/etc/passwd`` naming uid 1000 ``agent``,
  and ``/home/user`` -> ``/workspace``.

Built once per (template digest, guest recipe) and cached beside the default
image; a new template digest is a new image, never an edit of an old one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import image as _image

HOST_USR_INSIDE = "/.glassroom-host/usr"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

#: pid 1: busybox sh, which starts the agent on the host's hidden python.
LAUNCH = """#!/.glassroom/busybox sh
export LC_ALL=C TZ=UTC0
exec {loader} --library-path {libdir} {python} -I -S -B -c \\
 'import sys;sys.path.insert(0,"/.glassroom")
try:
    import cjson;sys.modules["json"]=cjson
except ImportError:
    pass
import agent;agent.main()'
"""


def _static_busybox() -> str:
    for cand in BUSYBOX_CANDIDATES:
        if os.path.isfile(cand) and not _dynamic(cand):
            return cand
    raise _image._unavailable("a static busybox is needed for a template's microVM image "
                              "(apt-get install busybox-static)")  # fmt: skip


def _dynamic(path: str) -> bool:
    r = subprocess.run(["ldd", path], capture_output=True, text=True, check=False)
    return r.returncode == 0 and "=>" in r.stdout


def _host_python(stage: Path) -> tuple[str, str, str]:
    """Copy the host's python3 runtime under HOST_USR_INSIDE; (loader, libdir, python)
    as the guest sees them."""
    from ...policy._compile import _elf_interpreter

    real = os.path.realpath("/usr/bin/python3")
    loader = _elf_interpreter(real) or ""
    if not (real.startswith("/usr/") and loader.startswith("/usr/")):
        raise _image._unavailable(f"the host's {real} and its loader {loader} must be under /usr")
    side = Path(tempfile.mkdtemp(prefix=".hostpy-", dir=stage.parent))
    try:
        _image._copy_into(side, real)
        for dirpath, dirnames, filenames in os.walk(_image.PYTHON_LIB):
            rel = os.path.relpath(dirpath, _image.PYTHON_LIB)
            if rel == ".":
                dirnames[:] = [d for d in dirnames if d not in _image.PYTHON_SKIP]
                filenames = [f for f in filenames if f not in _image.PYTHON_SKIP]
            for name in filenames:
                _image._copy_into(side, os.path.join(dirpath, name))
        elves = [str(p) for p in side.rglob("*") if p.is_file() and not p.is_symlink()
                 and _image._is_elf(str(p))]  # fmt: skip
        for lib in sorted(_image._libs(["/" + str(Path(p).relative_to(side)) for p in elves])):
            _image._copy_into(side, lib)
        _image._copy_into(side, loader)
        dest = stage / HOST_USR_INSIDE.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(side / "usr", dest)
    finally:
        shutil.rmtree(side, ignore_errors=True)

    def hidden(p: str) -> str:
        return HOST_USR_INSIDE + p.removeprefix("/usr")

    return hidden(loader), hidden(os.path.dirname(loader)), hidden(real)


def _stage(tree: Path, stage: Path) -> None:
    from ...policy._template import check_tree

    check_tree(tree)  # no /etc/ld.so.preload: pid 1 runs as guest root on the host's loader
    shutil.copytree(tree, stage, symlinks=True, dirs_exist_ok=True)
    for dirpath, _dirs, filenames in os.walk(stage):  # the store's copy is read-only
        os.chmod(dirpath, 0o755)
        for name in filenames:
            f = os.path.join(dirpath, name)
            if not os.path.islink(f):
                os.chmod(f, os.stat(f).st_mode | 0o200)
    for name in ("home", "run", "tmp", "workspace", "proc", "sys", "dev", ".glassroom",
                 ".glassroom-net", ".glassroom-host"):  # fmt: skip
        p = stage / name
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
    for d in _image.GUEST_DIRS:
        (stage / d).mkdir(parents=True, exist_ok=True)
    (stage / "home").mkdir(exist_ok=True)
    os.symlink("/workspace", stage / "home" / "user")
    (stage / "run" / "glassroom" / "secrets").mkdir(parents=True, exist_ok=True)
    os.symlink("/run/glassroom-net", stage / ".glassroom-net")
    etc = stage / "etc"
    if etc.is_symlink() or (etc.exists() and not etc.is_dir()):
        etc.unlink()
    etc.mkdir(exist_ok=True)
    for name, text in (("passwd", "root:x:0:0:root:/:/bin/sh\n"
                                  "agent:x:1000:1000:agent:/workspace:/bin/sh\n"),
                       ("group", "root:x:0:\nagent:x:1000:\n"),
                       ("hostname", "sandbox\n")):  # fmt: skip
        p = etc / name
        if p.is_symlink():
            p.unlink()
        p.write_text(text)


def build(base: _image.Image, tree: Path, digest: str) -> _image.Image:
    """The cached image for template ``digest`` (``tree``: its rootfs), built if missing."""
    cache = base.rootfs.parent
    py = os.stat(os.path.realpath("/usr/bin/python3"))
    host = f"{py.st_size}:{py.st_mtime_ns}:{os.stat(_image.PYTHON_LIB).st_mtime_ns}"
    binary = _image.compiled_agent() if base.compiled else None
    key = _image._digest(base.image_id.encode(), digest.encode(), LAUNCH.encode(),
                         Path(__file__).read_bytes(), host.encode(),
                         _image.agent_key(binary))  # fmt: skip
    dest = cache / f"rootfs-tpl-{key}.ext4"
    with _image.lock_file(cache / ".lock"):
        if not (dest.exists() and _image._manifest_path(dest).exists()):
            _build(tree, dest, binary)
    # The id names this very file: a booted-idle snapshot is only ever paired
    # with the image it booted.  (An image rebuilt under the same key -- after a
    # prune -- differs in its block layout, and a guest restored from the old
    # snapshot would read the new disk with the old page cache: EBADMSG.)
    st = dest.stat()
    built = f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}".encode()
    return _image.Image(base.kernel, base.initrd, dest,
                        _image._digest(base.image_id.encode(), key.encode(), built),
                        base.kernel_release, compiled=binary is not None)  # fmt: skip


def _build(tree: Path, dest: Path, binary: Path | None = None) -> None:
    mke2fs = shutil.which("mke2fs", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not mke2fs:
        raise _image._unavailable("mke2fs is missing: apt-get install e2fsprogs")
    stage = Path(tempfile.mkdtemp(prefix=".tplroot-", dir=dest.parent))
    try:
        _stage(tree, stage)
        shutil.copy2(_static_busybox(), stage / ".glassroom" / "busybox")
        for src in _image._guest_sources():
            shutil.copy2(src, stage / ".glassroom" / src.name)
        if binary is not None:  # static: it needs nothing of the template's /usr
            shutil.copyfile(binary, stage / ".glassroom" / _image.GUEST_AGENT)
            os.chmod(stage / ".glassroom" / _image.GUEST_AGENT, 0o755)
        loader, libdir, python = _host_python(stage)
        init = stage / ".glassroom" / "init"
        init.write_text(LAUNCH.format(loader=loader, libdir=libdir, python=python))
        os.chmod(init, 0o755)
        subprocess.run(["/usr/bin/python3", "-I", "-m", "compileall", "-q",
                        str(stage / ".glassroom")], check=False,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        _image.seal(stage, dest, mke2fs)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
