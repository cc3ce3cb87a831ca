"""Approvals for ``network.ask``: a request is held until a person decides.

Pending approvals are files in ``<state dir>/approvals/`` so that another
process (``glassroom approvals list|allow|deny ID``) can decide:

* ``ID.json``: the request (sandbox, host, port, method, path, rule, expiry);
  written by the proxy, removed when the request is settled.
* ``ID.decision``: created with ``O_EXCL`` by whoever decides first (the CLI,
  or the proxy itself for an SDK callback or the timeout), holding
  ``{"decision": "allow"|"deny", "by": WHO}``.  The first decision wins.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import _config
from .._errors import GlassroomError


class ApprovalError(GlassroomError):
    pass


def approvals_dir() -> Path:
    return _config.state_dir() / "approvals"


@dataclass(frozen=True)
class Approval:
    id: str
    sandbox: str
    host: str
    port: int
    method: str | None
    path: str | None
    rule: str
    created: float
    expires: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _who() -> str:
    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        name = str(os.getuid())
    sudo = os.environ.get("SUDO_USER")
    return f"cli:{sudo}(via {name})" if sudo else f"cli:{name}"


def create(sandbox: str, host: str, port: int, method: str | None, path: str | None,
           rule: str, timeout_s: float) -> Approval:  # fmt: skip
    d = approvals_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = time.time()
    ap = Approval("ap-" + secrets.token_hex(5), sandbox, host, port, method, path, rule,
                  now, now + timeout_s)  # fmt: skip
    tmp = d / f".{ap.id}.tmp"
    tmp.write_text(json.dumps(ap.as_dict()))
    os.replace(tmp, d / f"{ap.id}.json")
    return ap


def decide(approval_id: str, decision: str, by: str | None = None) -> dict[str, Any]:
    """Record a decision; the first one wins.  Returns the decision in force."""
    if decision not in ("allow", "deny"):
        raise ApprovalError(f"decision must be allow or deny, not {decision!r}")
    if not approval_id.startswith("ap-") or not approval_id[3:].isalnum():
        raise ApprovalError(f"{approval_id!r} is not an approval id")
    d = approvals_dir()
    if not (d / f"{approval_id}.json").exists():
        raise ApprovalError(f"no pending approval {approval_id} (settled, expired or unknown)")
    rec = {"decision": decision, "by": by or _who(), "at": time.time()}
    try:
        fd = os.open(d / f"{approval_id}.decision", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_decision(approval_id) or rec
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(rec))
    return rec


def read_decision(approval_id: str) -> dict[str, Any] | None:
    try:
        data = json.loads((approvals_dir() / f"{approval_id}.decision").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("decision") in ("allow", "deny") else None


def settle(approval_id: str) -> None:
    d = approvals_dir()
    for suffix in (".json", ".decision"):
        with contextlib.suppress(OSError):
            (d / f"{approval_id}{suffix}").unlink()


def pending() -> list[Approval]:
    d = approvals_dir()
    out: list[Approval] = []
    if not d.is_dir():
        return out
    for p in sorted(d.glob("ap-*.json")):
        try:
            data = json.loads(p.read_text())
            ap = Approval(**data)
        except (OSError, ValueError, TypeError):
            continue
        if not (d / f"{ap.id}.decision").exists():
            out.append(ap)
    return sorted(out, key=lambda a: a.created)
