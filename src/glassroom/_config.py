"""Where glassroom keeps its host-side state, and who the sandbox runs as.

Every location can be overridden by an environment variable of the
*supervisor* (never seen inside a sandbox), so tests and services can keep
their state apart.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Host uid/gid the sandbox runs as when glassroom itself runs as root:
#: "root outside, nobody inside".  Inside, the sandbox sees uid/gid 1000.
DEFAULT_SANDBOX_UID = 65534
DEFAULT_SANDBOX_GID = 65534
INSIDE_UID = 1000
INSIDE_GID = 1000


def is_root() -> bool:
    return os.geteuid() == 0


def state_dir() -> Path:
    """Runtime state (sandbox records for the reaper, the init script)."""
    env = os.environ.get("GLASSROOM_STATE_DIR")
    if env:
        return Path(env)
    if is_root():
        return Path("/run/glassroom")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.access(runtime, os.W_OK):
        return Path(runtime) / "glassroom"
    return Path(f"/tmp/glassroom-{os.geteuid()}")


def audit_log_path() -> Path:
    env = os.environ.get("GLASSROOM_AUDIT_LOG")
    if env:
        return Path(env)
    if is_root():
        return Path("/var/lib/glassroom/audit.jsonl")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "glassroom" / "audit.jsonl"


def snapshot_dir() -> Path:
    """Where the SDK keeps snapshots and paused images (``docs/snapshots.md``);
    ``glassroom serve`` uses its ``data_dir`` instead.  Beside the audit log by
    default: both are the supervisor's records, on disk, outside every sandbox."""
    env = os.environ.get("GLASSROOM_SNAPSHOT_DIR")
    if env:
        return Path(env)
    return audit_log_path().parent / "snapshots"


def init_build_dir() -> Path:
    """Where the compiled in-sandbox init is built (``glassroom init build``):
    beside the audit log, on disk, so a build outlives a reboot (the root
    state dir, /run/glassroom, is a tmpfs).  ``$GLASSROOM_INIT_DIR`` moves it."""
    env = os.environ.get("GLASSROOM_INIT_DIR")
    if env:
        return Path(env)
    if is_root():
        return Path("/var/lib/glassroom/init")
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "glassroom" / "init"


def template_dir() -> Path:
    """Where templates (read-only root filesystems, ``docs/templates.md``) are
    kept: ``$GLASSROOM_TEMPLATE_DIR``, else beside the audit log."""
    env = os.environ.get("GLASSROOM_TEMPLATE_DIR")
    if env:
        return Path(env)
    return audit_log_path().parent / "templates"


def sandbox_ids() -> tuple[int, int]:
    """The host uid/gid sandboxed code runs as."""
    if not is_root():
        return os.geteuid(), os.getegid()
    uid = int(os.environ.get("GLASSROOM_SANDBOX_UID", DEFAULT_SANDBOX_UID))
    gid = int(os.environ.get("GLASSROOM_SANDBOX_GID", DEFAULT_SANDBOX_GID))
    if uid == 0 or gid == 0:
        raise ValueError("GLASSROOM_SANDBOX_UID/GID must not be 0: nobody inside")
    return uid, gid


#: Host uids for microVM QEMU processes (as root): one per running VM, never
#: shared with another VM, with the namespaces tier's 65534, or with a user.
DEFAULT_VMM_UIDS = (2_000_000_000, 65536)


def vmm_uid_range() -> tuple[int, int]:
    """(first uid, count) that QEMU processes run as: ``GLASSROOM_VMM_UIDS=FIRST:COUNT``."""
    raw = os.environ.get("GLASSROOM_VMM_UIDS")
    if not raw:
        return DEFAULT_VMM_UIDS
    try:
        first, count = (int(x) for x in raw.split(":"))
    except ValueError:
        raise ValueError(f"GLASSROOM_VMM_UIDS={raw!r}: expected FIRST:COUNT") from None
    if first <= 0 or count <= 0 or first + count > 2**32 - 1:
        raise ValueError(f"GLASSROOM_VMM_UIDS={raw!r}: the range must lie in 1..2^32-2")
    return first, count


def scratch_dir() -> Path:
    """Where per-sandbox scratch images (``/workspace``, ``/tmp``) are made.

    It must be a disk, not tmpfs: the image's pages would be memory again
    (``_sys/scratch.py`` refuses it).  Each image is unlinked as soon as it
    is in use, so nothing stays here.  ``GLASSROOM_SCRATCH_DIR`` moves it.
    """
    env = os.environ.get("GLASSROOM_SCRATCH_DIR")
    if env:
        return Path(env)
    if is_root():
        return Path("/var/lib/glassroom-scratch")
    # /var/tmp: on disk by convention, and writable without a home directory.
    # A dir someone else made there is refused (_sys/scratch.check_backing).
    return Path(f"/var/tmp/glassroom-scratch-{os.geteuid()}")


def cgroup_parent() -> str:
    return os.environ.get("GLASSROOM_CGROUP_PARENT", "glassroom")


def audit_anchor_key_path() -> Path:
    """The supervisor's Ed25519 key that signs audit-log anchors.

    Default: ``state_dir() / "audit-anchor.key"`` (the public key is beside it
    as ``audit-anchor.pub``).  ``GLASSROOM_AUDIT_ANCHOR_KEY`` moves it: the
    root default state dir is ``/run``, a tmpfs, and a key lost at reboot
    makes every earlier anchor unverifiable, so a service should point this
    at persistent storage.
    """
    env = os.environ.get("GLASSROOM_AUDIT_ANCHOR_KEY")
    if env:
        return Path(env)
    return state_dir() / "audit-anchor.key"


def audit_sinks() -> list[str]:
    """External audit sinks from ``GLASSROOM_AUDIT_SINKS`` (comma-separated URLs).

    Read by every :class:`glassroom.audit.AuditLog` that is not given its own
    ``sinks``, so a supervisor forwards records without code changes.  Empty
    items are ignored; the URLs are validated by the audit package.
    """
    raw = os.environ.get("GLASSROOM_AUDIT_SINKS", "")
    return [item.strip() for item in raw.split(",") if item.strip()]
