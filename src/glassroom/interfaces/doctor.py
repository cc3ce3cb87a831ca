"""``glassroom doctor``: what this host can enforce, probe by probe."""

from __future__ import annotations

import os
from typing import Any

from .. import _config


def report() -> dict[str, Any]:
    from .._sys import probe

    userns_ok, userns_detail = probe.userns()
    sec_ok, sec_detail = probe.seccomp()
    kvm_kind, kvm_detail = probe.kvm()
    abi = probe.landlock_abi()
    bwrap = probe.bwrap()
    ptrace_ok, ptrace_detail = probe.ptrace()
    rep: dict[str, Any] = {
        "running_as": "root" if _config.is_root() else f"uid {_config.sandbox_ids()[0]}",
        "user_namespaces": {"ok": userns_ok, "detail": userns_detail},
        "landlock": {"ok": abi > 0, "abi": abi},
        "seccomp": {"ok": sec_ok, "detail": sec_detail},
        "file_audit": {"ok": ptrace_ok, "detail": ptrace_detail},
        "cgroups": {k: {"version": v[0], "mount": v[1]} for k, v in probe.cgroups().items()},
        "bwrap": bwrap,
        "kvm": {"kind": kvm_kind, "detail": kvm_detail},
        "runsc": probe.runsc(),
        "qemu": probe.qemu(),
        "state_dir": str(_config.state_dir()),
        "state_dir_reachable": _state_dir_reach(),
        "audit_log": str(_config.audit_log_path()),
    }
    missing = [what for what, ok in (
        (f"state dir: {rep['state_dir_reachable']['detail']}", rep["state_dir_reachable"]["ok"]),
        ("user namespaces", userns_ok), ("landlock", abi > 0), ("seccomp", sec_ok),
        ("bwrap", bool(bwrap)),
        ("cgroups memory, pids, cpu", all(c in rep["cgroups"] for c in ("memory", "pids", "cpu"))),
    ) if not ok]  # fmt: skip
    rep["backends"] = {
        "namespaces": "ready" if not missing else "unavailable: " + "; ".join(missing),
        "gvisor": _gvisor_status(rep),
        "microvm": _microvm_status(),
    }
    rep["templates"] = _templates()
    return rep


def _templates() -> dict[str, Any]:
    """The local template store and what it holds (``glassroom template list``)."""
    from .._errors import GlassroomError
    from ..templates import TemplateStore

    store = TemplateStore()
    try:
        items = [{"name": t.name, "digest": t.digest, "files": t.meta.files,
                  "size_bytes": t.meta.size_bytes} for t in store.list()]  # fmt: skip
    except (OSError, GlassroomError) as exc:
        return {"dir": str(store.root), "error": str(exc), "items": []}
    return {"dir": str(store.root), "items": items}


def _state_dir_reach() -> dict[str, Any]:
    """Can the sandbox uid reach the state dir?  As root, bwrap runs as that
    uid and binds the init from there; a 0700 dir above it (any ``mktemp -d``)
    makes every start fail, so say so here, naming the dir in the way."""
    from pathlib import Path

    from .. import _reach

    state = _config.state_dir()
    if not _config.is_root():
        return {"ok": True, "detail": f"{state}: sandboxes run as glassroom's own uid"}
    uid, gid = _config.sandbox_ids()
    here: Path = state
    while not here.exists() and here != here.parent:  # it is made at the first start
        here = here.parent
    why = _reach.blocker(here, uid, gid, search=True)
    return {"ok": why is None, "detail": why or f"{state}: reachable by sandbox uid {uid}"}


def _microvm_status() -> str:
    """The tier's state, and which guest kernel a VM would boot."""
    from ..backends.microvm import image, kernel
    from ..backends.microvm.qemu import status

    choice = image.kernel_choice()
    built = kernel.find(image.cache_dir()) if choice in ("auto", "built") else None
    if built is not None:
        which = f"guest kernel: built {built.release}"
    elif choice == "path":
        which = f"guest kernel: {os.environ.get(image.KERNEL_ENV)}"
    else:
        which = "guest kernel: Debian's stock (run `glassroom microvm prepare` to build one)"
    return f"{status()}; {which}"


def _gvisor_status(rep: dict[str, Any]) -> str:
    """gvisor is ready when runsc is there and its chosen platform works here."""
    if not rep["runsc"]:
        return "unavailable: runsc missing (apt-get install runsc)"
    if not _config.is_root():
        return "unavailable: runsc needs glassroom to run as root"
    from .._errors import BackendUnavailable
    from ..backends import _gvisor_spec

    rep["runsc_platforms"] = _gvisor_spec.probe_platforms()
    try:
        chosen = _gvisor_spec.choose_platform()
    except BackendUnavailable as exc:
        return f"unavailable: {exc}"
    if rep["runsc_platforms"].get(chosen) != "works":
        return f"unavailable: platform {chosen}: {rep['runsc_platforms'].get(chosen)}"
    if "memory" not in rep["cgroups"]:
        return "unavailable: no memory cgroup"
    return "ready"


def render(rep: dict[str, Any]) -> str:
    def mark(ok: bool) -> str:
        return "ok  " if ok else "MISS"

    cg = ", ".join(f"{k}=v{v['version'].lstrip('v')}" for k, v in sorted(rep["cgroups"].items()))
    lines = [
        f"running as      {rep['running_as']}",
        f"{mark(rep['user_namespaces']['ok'])} user namespaces  {rep['user_namespaces']['detail']}",
        f"{mark(rep['landlock']['ok'])} landlock         ABI {rep['landlock']['abi']}",
        f"{mark(rep['seccomp']['ok'])} seccomp          {rep['seccomp']['detail']}",
        f"{mark(bool(rep['cgroups']))} cgroups          {cg or 'none'}",
        f"{mark(rep['file_audit']['ok'])} file audit       {rep['file_audit']['detail']}",
        f"{mark(bool(rep['bwrap']))} bwrap            {rep['bwrap'] or 'not installed'}",
        f"{mark(rep['kvm']['kind'] == 'real')} kvm              "
        f"{rep['kvm']['kind']}: {rep['kvm']['detail']}",
        f"{mark(bool(rep['runsc']))} runsc            {rep['runsc'] or 'not installed'}",
        *[f"       platform  {k}: {v}" for k, v in rep.get("runsc_platforms", {}).items()],
        f"{mark(bool(rep['qemu']))} qemu             {rep['qemu'] or 'not installed'}",
        f"{mark(rep['state_dir_reachable']['ok'])} state dir        "
        f"{rep['state_dir_reachable']['detail']}",
        "backends:",
    ]
    lines += [f"  {k:<11} {v}" for k, v in rep["backends"].items()]
    tpl = rep.get("templates") or {"dir": "?", "items": []}
    names = ", ".join(f"{t['name']} ({t['digest'][7:19]})" for t in tpl["items"]) or "none"
    lines += [f"templates       {names}  in {tpl['dir']}"]
    lines += [f"state dir       {rep['state_dir']}", f"audit log       {rep['audit_log']}"]
    return "\n".join(lines)
