"""``glassroom microvm prepare``: build the guest kernel (or fetch Debian's, with
``GLASSROOM_MICROVM_KERNEL=stock``), build the images, and save the booted-idle
snapshot for the default VM shape (when an accel is allowed)."""

from __future__ import annotations

from typing import Any

from ... import _config
from ..._errors import BackendUnavailable
from . import image, kernel, qemu


def prepare(snapshot: bool = True) -> dict[str, Any]:
    pruned: list[str] = []
    image.fetch_stock(image.cache_dir())  # the fallback kernel, fetched now, not at boot
    if image.kernel_choice() in ("auto", "built"):
        built = kernel.build(image.cache_dir())
        pruned += kernel.prune(image.cache_dir(), built)
    img = image.prepare(fetch=True)
    stock = image.prepare(fetch=True, choice="stock")  # the fallback's initramfs, kept
    out: dict[str, Any] = {
        "cache": str(image.cache_dir()),
        "kernel": str(img.kernel),
        "kernel_release": img.kernel_release,
        "boot": "direct" if img.direct else "initramfs",
        "pruned": pruned + image.prune(img, keep=(stock.initrd,) if stock.initrd else ())
        + qemu.prune_snapshots(img),
        "image_id": img.image_id,
        **img.sizes(),
    }
    if snapshot:
        from ...policy import compile as compile_policy
        from ...policy import validate_policy

        try:
            accel = qemu.choose_accel()
        except BackendUnavailable as exc:
            out["snapshot"] = f"skipped: {exc}"
            return out
        import dataclasses

        from ._instance import choose_agent

        plan = compile_policy(validate_policy({"risk": "high"}), "microvm")
        lim = plan.limits
        # the agent the default policy boots (the compiled one when it is built)
        img = dataclasses.replace(img, agent=choose_agent(img)[0])
        out["agent"] = img.agent
        ram, vcpus = qemu.vm_size(lim.memory_bytes, lim.disk_bytes, lim.cpus)
        path = qemu.ensure_snapshot(img, accel, ram, vcpus, _config.state_dir() / "microvm",
                                    -(-lim.disk_bytes // (1 << 20)))  # fmt: skip
        out["snapshot"] = str(path)
        out["snapshot_bytes"] = path.stat().st_size
    return out
