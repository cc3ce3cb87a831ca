"""Templates: import time and size, and cold start from a template against the
host-/usr default, per tier, in the same run.

Two images are made here (no registry is reachable): ``busy``, a static
busybox (a few MB), and ``py``, busybox plus the host's python3 runtime (a
realistic interpreter image, tens of MB).  Each is imported into a fresh
store (time, files, bytes).  Then, per tier, round by round: create + run
``sh -c true`` + destroy with the default policy (the host's /usr) and with
each template; the microVM's first template sandbox (image build, cold boot,
snapshot) is timed apart.  Raw bwrap with the tree as ``/`` is the floor for
namespaces.  Medians and p95 in ms, plus ratios; prints one JSON object.

The built-in ``base`` (Debian, about 450 MB) is in the same rounds when the
default store holds it (hard-linked into the bench's store, not copied);
``--builtins`` also rebuilds ``base`` and ``code-interpreter`` from their
recipes there and times it (the apt downloads come from the default store's
cache, so this is the bootstrap, unpack and hashing, not the network).

    python bench/templates.py [--runs 20] [--gvisor-runs 10] [--microvm-runs 3] [--builtins]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from glassroom import GlassroomError, Sandbox
from glassroom._config import template_dir
from glassroom.templates import BUILTINS, TemplateStore, ensure, import_oci
from glassroom.templates.testing import Entry, busybox_entries, docker_save_tar

PY_LIB = "/usr/lib/python3.11"
PY_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data"}


def busy_entries() -> dict[str, Entry]:
    return busybox_entries(("sh", "true"))


def py_entries() -> dict[str, Entry]:
    """busybox, plus the host's python3 with its standard library and libraries."""
    out = busy_entries()
    real = os.path.realpath("/usr/bin/python3")
    out["usr/bin/" + os.path.basename(real)] = (Path(real).read_bytes(), 0o755)
    out["usr/bin/python3"] = ("link", os.path.basename(real))
    for dirpath, dirnames, names in os.walk(PY_LIB):
        if dirpath == PY_LIB:
            dirnames[:] = [d for d in dirnames if d not in PY_SKIP]
        for n in names:
            p = os.path.join(dirpath, n)
            if os.path.isfile(p) and not os.path.islink(p):
                out[p.lstrip("/")] = Path(p).read_bytes()
    ldd = subprocess.run(["ldd", real], capture_output=True, text=True, check=False).stdout
    for tok in ldd.split():
        if tok.startswith("/") and os.path.exists(tok):
            r = os.path.realpath(tok)
            out[r.lstrip("/")] = (Path(r).read_bytes(), 0o755)
            if tok != r:
                out[tok.lstrip("/")] = ("link", r)
    return out


def stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]
    return {"median_ms": round(statistics.median(xs), 2), "p95_ms": round(p95, 2), "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--gvisor-runs", type=int, default=10)
    ap.add_argument("--microvm-runs", type=int, default=3)
    ap.add_argument("--builtins", action="store_true",
                    help="rebuild the built-in templates in the bench's store, timed")
    args = ap.parse_args()
    default_store = TemplateStore(template_dir())
    work = Path(tempfile.mkdtemp(prefix="glassroom-bench-tpl-"))
    os.chmod(work, 0o755)  # the sandbox uid (as root) reads the store
    os.environ["GLASSROOM_TEMPLATE_DIR"] = str(work / "store")
    os.environ.setdefault("GLASSROOM_MICROVM_ALLOW_TCG", "1")
    log = work / "audit.jsonl"
    store = TemplateStore(work / "store")
    out: dict[str, object] = {"templates": {}}
    for name, make in (("busy", busy_entries), ("py", py_entries)):
        img = docker_save_tar(work / f"{name}.tar", make())
        t0 = time.perf_counter()
        t = import_oci(img, store, name)
        out["templates"][name] = {  # type: ignore[index]
            "import_ms": round((time.perf_counter() - t0) * 1000, 1),
            "image_bytes": img.stat().st_size, "files": t.meta.files,
            "tree_bytes": t.meta.size_bytes,
        }  # fmt: skip
    policies = {
        "default": {"tools": {"allow": ["sh"]}},
        "busy": {"template": "busy", "tools": {"allow": ["sh"]}},
        "py": {"template": "py", "tools": {"allow": ["sh", "python3"]}},
    }
    if args.builtins:
        (store.root / "apt-cache").parent.mkdir(parents=True, exist_ok=True)
        os.symlink(default_store.root / "apt-cache", store.root / "apt-cache")
        for name in BUILTINS:
            t0 = time.perf_counter()
            ((t, _),) = ensure(store, (name,), rebuild=True)
            out["templates"][name] = {  # type: ignore[index]
                "build_s": round(time.perf_counter() - t0, 1), "files": t.meta.files,
                "tree_bytes": t.meta.size_bytes, "packages": len(t.meta.source["packages"]),
            }  # fmt: skip
    else:
        try:
            t = default_store.get("base")
        except GlassroomError:
            t = None
        if t is not None:  # hard links: the same tree, no copy
            obj = store.root / "objects" / t.rootfs.parent.name
            obj.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-al", str(t.rootfs.parent), str(obj)], check=True)
            store.tag(t.digest, "base")
            out["templates"]["base"] = {"files": t.meta.files,  # type: ignore[index]
                                        "tree_bytes": t.meta.size_bytes}  # fmt: skip
    if "base" in out["templates"]:  # type: ignore[operator]
        policies["base"] = {"template": "base", "tools": {"allow": ["sh"]}}
    tiers = {"namespaces": args.runs, "gvisor": args.gvisor_runs, "microvm": args.microvm_runs}
    risk = {"namespaces": "low", "gvisor": "medium", "microvm": "high"}
    for tier, runs in tiers.items():
        if runs <= 0:
            continue
        series: dict[str, list[float]] = {k: [] for k in policies}
        first: dict[str, float] = {}
        for name, pol in policies.items():  # warm-up: the plan, and the microVM's image
            t0 = time.perf_counter()
            with Sandbox({**pol, "risk": risk[tier]}, backend=tier, audit_log=log) as sb:
                sb.run(["sh", "-c", "true"])
            first[name] = round((time.perf_counter() - t0) * 1000, 1)
        for _ in range(runs):
            for name, pol in policies.items():
                t0 = time.perf_counter()
                with Sandbox({**pol, "risk": risk[tier]}, backend=tier, audit_log=log) as sb:
                    sb.run(["sh", "-c", "true"])
                series[name].append((time.perf_counter() - t0) * 1000)
        got = {k: stats(v) for k, v in series.items()}
        base = got["default"]["median_ms"]
        out[tier] = {
            **got, "first_sandbox_ms": first,
            "ratio_vs_default": {k: round(v["median_ms"] / base, 2) for k, v in got.items()},
        }  # fmt: skip
    if shutil.which("bwrap") and args.runs > 0:
        tree = store.get("busy").rootfs
        # The same shape of root as glassroom's: the tree's entries bound onto
        # bwrap's own root (a read-only tree cannot hold new mount points).
        binds = [a for e in sorted(os.listdir(tree))
                 for a in ("--ro-bind", str(tree / e), f"/{e}")]  # fmt: skip
        argv = ["bwrap", "--unshare-all", "--die-with-parent", *binds, "--proc", "/proc",
                "--dev", "/dev", "--tmpfs", "/tmp", "--", "/bin/sh", "-c", "true"]  # fmt: skip
        raw = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            subprocess.run(argv, check=True)
            raw.append((time.perf_counter() - t0) * 1000)
        raw_s = stats(raw)
        out["raw_bwrap_busy"] = raw_s
        ns = out.get("namespaces")
        if isinstance(ns, dict):
            ns["busy_vs_raw_bwrap"] = round(ns["busy"]["median_ms"] / raw_s["median_ms"], 2)
    print(json.dumps(out, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
