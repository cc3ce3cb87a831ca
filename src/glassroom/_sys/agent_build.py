"""Build the compiled in-sandbox init (``_sys/agent/*.c``) of the namespaces tier.

``glassroom-init`` is a static C program that speaks exactly the protocol
of ``sandbox_init.py`` (with ``landlock.py`` and ``init_net.py``) on the
same fd, so the supervisor's side does not change; it starts in well under
a millisecond where the Python init costs ~10 ms, and, being static, needs
nothing of the sandbox's ``/usr`` (see ``backends/namespaces.py``).

The binary is named by a digest of its sources and the compiler flags:
``find`` returns it only if it was built from the sources installed now,
so a stale build is never used.  ``build`` is idempotent and atomic.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

from .._errors import GlassroomError

SRC_DIR = Path(__file__).resolve().parent / "agent"
CFLAGS = ("-static", "-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11",
          "-fno-strict-aliasing", "-D_FORTIFY_SOURCE=2")  # fmt: skip
NAME = "glassroom-init"


class BuildError(GlassroomError):
    """The compiled init could not be built (no compiler, no static libc, ...)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, rule="init")


def _sources() -> list[Path]:
    return sorted(p for p in SRC_DIR.iterdir() if p.suffix in (".c", ".h"))


_digest_cache: dict[tuple[tuple[str, int, int], ...], str] = {}


def source_digest() -> str:
    """The first 16 hex digits of sha256(the sources, the compiler flags).

    Asked on every sandbox start (``find``): hashed again only when a
    source's size or mtime changed."""
    srcs = _sources()
    key = tuple((p.name, st.st_mtime_ns, st.st_size) for p in srcs for st in [p.stat()])
    cached = _digest_cache.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    for p in srcs:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update("\0".join(CFLAGS).encode())
    digest = h.hexdigest()[:16]
    _digest_cache.clear()
    _digest_cache[key] = digest
    return digest


def binary_path(state_dir: Path) -> Path:
    """The current build's path in ``state_dir`` (tests copy a build there)."""
    return Path(state_dir) / "agent" / f"{NAME}-{source_digest()}"


#: Where root builds it (``_config.init_build_dir`` as root).
SYSTEM_DIR = Path("/var/lib/glassroom/init")


def _dirs(state_dir: Path) -> tuple[Path, ...]:
    """Where a build is looked for: the state dir's copy, then the build dir
    (``_config.init_build_dir``: on disk, so it survives a reboot); for a
    user, then root's build (one machine, one microVM image: a user who has
    not built it boots the image root made, which holds root's build)."""
    from .. import _config

    dirs: tuple[Path, ...] = (Path(state_dir) / "agent", _config.init_build_dir())
    if not _config.is_root() and SYSTEM_DIR not in dirs:
        dirs += (SYSTEM_DIR,)
    return dirs


def locate(name: str, state_dir: Path) -> Path | None:
    """The build called ``name`` (``glassroom-init-<digest>``), wherever it is."""
    if not name.startswith(NAME + "-") or "/" in name or name in (".", ".."):
        return None
    for d in _dirs(state_dir):
        if _usable(d / name):
            return d / name
    return None


def _usable(path: Path) -> bool:
    try:
        st = path.stat()
        top = path.parent.stat()
    except OSError:
        return False
    if path.parent == SYSTEM_DIR and (st.st_uid != 0 or top.st_uid != 0
                                      or (st.st_mode | top.st_mode) & 0o022):  # fmt: skip
        return False  # root's build only as root left it: nobody else could have written it
    return stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111) and st.st_size > 0


def find(state_dir: Path) -> Path | None:
    """The binary built from the current sources, or None."""
    return locate(f"{NAME}-{source_digest()}", state_dir)


def _compiler() -> str:
    for cc in (os.environ.get("CC", ""), "cc", "gcc"):
        if cc and shutil.which(cc):
            return cc
    raise BuildError("no C compiler (cc/gcc): apt-get install gcc libc6-dev")


def build(state_dir: Path | None = None) -> Path:
    """Compile the init unless it is built; its path.  Into the build dir
    (``_config.init_build_dir``), or ``<state_dir>/agent/`` when given.

    The dir and the binary are 0755, and (as root) the dirs above it that
    root owns become searchable by every uid (``_reach.make_traversable``):
    bwrap, running as the sandbox uid, binds it from there."""
    from .. import _config, _reach

    if state_dir is None:
        dest = _config.init_build_dir() / f"{NAME}-{source_digest()}"
    else:
        dest = binary_path(state_dir)
    if _usable(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    os.chmod(dest.parent, 0o755)
    if state_dir is not None:
        os.chmod(state_dir, os.stat(state_dir).st_mode | 0o755)
    _reach.make_traversable(dest.parent)
    cc = _compiler()
    with tempfile.TemporaryDirectory(prefix="glassroom-init-") as tmp:
        # the sources as they are now (the digest's), compiled from a copy
        for p in _sources():
            shutil.copyfile(p, Path(tmp) / p.name)
        out = Path(tmp) / NAME
        srcs = [str(Path(tmp) / p.name) for p in _sources() if p.suffix == ".c"]
        proc = subprocess.run([cc, *CFLAGS, "-o", str(out), *srcs],
                              capture_output=True, text=True, check=False)  # fmt: skip
        if proc.returncode != 0:
            raise BuildError(f"{cc} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.chmod(out, 0o755)
        part = dest.parent / f".{dest.name}.{os.getpid()}.{threading.get_ident()}"
        shutil.copyfile(out, part)
        os.chmod(part, 0o755)
        os.replace(part, dest)
    return dest
