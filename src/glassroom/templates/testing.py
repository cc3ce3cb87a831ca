"""Images for tests and benchmarks, made locally (no registry is reachable).

``docker_save_tar`` writes a one-layer ``docker save`` tar from a dict of
entries; ``busybox_entries`` is the smallest useful root (a static busybox
and its applet links), which is how the tests and ``bench/templates.py`` get
a template without a network.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from ._store import TemplateStore

#: An entry: bytes (a file, 0644), (bytes, mode), ("link", target), or None (a dir).
Entry = bytes | tuple[bytes, int] | tuple[str, str] | None


def layer_tar(entries: Mapping[str, Entry]) -> bytes:
    """An uncompressed layer holding ``entries`` (parents made as needed)."""
    buf = io.BytesIO()
    made: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        def parents(name: str) -> None:
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in made:
                    made.add(d)
                    ti = tarfile.TarInfo(d)
                    ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                    tf.addfile(ti)

        for name in sorted(entries):
            e = entries[name]
            parents(name)
            ti = tarfile.TarInfo(name)
            if e is None:
                if name in made:
                    continue
                made.add(name)
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            elif isinstance(e, tuple) and e[0] == "link":
                ti.type, ti.linkname = tarfile.SYMTYPE, str(e[1])
                tf.addfile(ti)
            else:
                data, mode = (e, 0o644) if isinstance(e, bytes) else (e[0], e[1])
                if not isinstance(data, bytes) or not isinstance(mode, int):
                    raise TypeError(f"{name}: a file entry is bytes or (bytes, mode)")
                ti.size, ti.mode = len(data), mode
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def docker_save_tar(dest: Path, entries: Mapping[str, Entry],
                    env: Mapping[str, str] | None = None) -> Path:  # fmt: skip
    """A ``docker save`` tar of one layer with ``entries`` and the config's Env."""
    layer = layer_tar(entries)
    cfg = json.dumps({
        "os": "linux", "architecture": "amd64",
        "config": {"Env": [f"{k}={v}" for k, v in (env or {"PATH": "/bin:/usr/bin"}).items()]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }).encode()  # fmt: skip
    manifest = json.dumps([{"Config": "c.json", "Layers": ["l/layer.tar"]}]).encode()
    with tarfile.open(dest, "w") as tf:
        for name, b in (("c.json", cfg), ("l/layer.tar", layer), ("manifest.json", manifest)):
            ti = tarfile.TarInfo(name)
            ti.size = len(b)
            tf.addfile(ti, io.BytesIO(b))
    return dest


def busybox_entries(applets: tuple[str, ...] = ("sh", "ls", "cat", "echo", "true")
                    ) -> dict[str, Entry]:  # fmt: skip
    """A static busybox at /bin/busybox and links for ``applets``."""
    bb = shutil.which("busybox") or "/bin/busybox"
    out: dict[str, Entry] = {"bin/busybox": (Path(bb).read_bytes(), 0o755)}
    for a in applets:
        out[f"bin/{a}"] = ("link", "busybox")
    return out


@contextlib.contextmanager
def scratch_store(prefix: str = "glassroom-test-tpl-") -> Iterator[tuple[TemplateStore, Path]]:
    """A fresh store in a new 0755 dir, made the default (``GLASSROOM_TEMPLATE_DIR``)
    while the block runs; (store, its dir) removed after.  Not under pytest's
    own tmp dirs: a pytest starting meanwhile makes those 0700 again, and as
    root bwrap runs as the sandbox uid, which must read the store."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(base, 0o755)
    store = TemplateStore(base / "store")
    saved = os.environ.get("GLASSROOM_TEMPLATE_DIR")
    os.environ["GLASSROOM_TEMPLATE_DIR"] = str(store.root)
    try:
        yield store, base
    finally:
        if saved is None:
            os.environ.pop("GLASSROOM_TEMPLATE_DIR", None)
        else:
            os.environ["GLASSROOM_TEMPLATE_DIR"] = saved
        shutil.rmtree(base, ignore_errors=True)
