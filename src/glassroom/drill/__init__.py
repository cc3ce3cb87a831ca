"""``glassroom drill``: the seed's "test your failure scenarios", as a battery.

Every attempt runs its attack in a fresh sandbox, and its harmless twin in
another, so a wall that simply breaks everything fails the drill as surely
as a wall that lets the attack through.  Where the supervisor can see the
block, the audit record and its rule are checked too.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import _config
from .._sandbox import Sandbox
from ..policy import Policy, default_policy, validate_policy
from ._attempts import Attempt, attempts, setup_ctx
from ._network import network_attempts, setup_net


@dataclass
class DrillResult:
    name: str
    what: str
    twin_ok: bool
    blocked: bool
    audited: bool
    detail: str
    rule: str | None

    @property
    def passed(self) -> bool:
        return self.twin_ok and self.blocked and self.audited

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "what": self.what, "passed": self.passed,
            "twin_ok": self.twin_ok, "blocked": self.blocked, "audited": self.audited,
            "rule": self.rule, "detail": self.detail,
        }  # fmt: skip


def _policy_for(base: Policy, extra: dict[str, Any]) -> Policy:
    data = base.model_dump()
    for section, values in extra.items():
        if isinstance(values, list):
            data[section] = values
        else:
            data[section] = {**data[section], **values}
    return validate_policy(data)


def _audited(log: Path, sandbox_id: str, rule: str | None) -> bool:
    if rule is None:
        return True
    with log.open() as f:
        for line in f:
            rec = json.loads(line)
            if (
                rec.get("sandbox") == sandbox_id
                and rec.get("decision") == "deny"
                and rec.get("rule") == rule
            ):
                return True
    return False


def _one(att: Attempt, base: Policy, backend: str | None, log: Path, ctx: Any) -> DrillResult:
    policy = _policy_for(base, att.policy)
    twin_env = {"GIVEN": "yes"}
    if att.same_sandbox:
        with Sandbox(policy, backend=backend, audit_log=log) as sb:
            sb.run(["sh", "-c", "touch /workspace/left /tmp/left"])
            twin = sb.run(att.twin, env=twin_env)
    else:
        with Sandbox(policy, backend=backend, audit_log=log, network=att.network) as sb:
            twin = sb.run(att.twin, env=twin_env)
    with Sandbox(policy, backend=backend, audit_log=log, network=att.network) as sb:
        attack = sb.run(att.attack)
        sid = sb.id
    twin_ok, blocked, detail = att.judge(twin, attack, ctx)
    return DrillResult(att.name, att.what, twin_ok, blocked, _audited(log, sid, att.rule),
                       detail if twin_ok else f"twin failed: {twin.exit_code} {twin.stderr[:80]}",
                       att.rule)  # fmt: skip


def run_drill(
    *, backend: str | None = None, audit_log: str | Path | None = None,
    only: list[str] | None = None,
) -> list[DrillResult]:  # fmt: skip
    log = Path(audit_log or _config.audit_log_path())
    base = default_policy()
    tmp = tempfile.mkdtemp(prefix="glassroom-drill-")
    ctx, cleanup = setup_ctx(tmp, set(base.tools.allow))
    net, net_cleanup = setup_net()
    try:
        out = []
        for att in attempts(ctx) + network_attempts(net):
            if only and att.name not in only:
                continue
            if att.tiers and (backend or "namespaces") not in att.tiers:
                continue  # e.g. writable host dirs on the microVM tier, which has none
            out.append(_one(att, base, backend, log, ctx))
        return out
    finally:
        net_cleanup()
        cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def render(results: list[DrillResult]) -> str:
    rows = [f"{'attempt':<24} {'twin':<5} {'blocked':<8} {'audit':<6} {'result':<6} detail"]
    for r in results:
        rows.append(
            f"{r.name:<24} {'ok' if r.twin_ok else 'FAIL':<5} {'yes' if r.blocked else 'NO':<8} "
            f"{'ok' if r.audited else 'MISS':<6} {'PASS' if r.passed else 'FAIL':<6} "
            f"{' '.join(r.detail.split())[:70]}"
        )
    failed = sum(not r.passed for r in results)
    rows.append(f"{len(results) - failed} passed, {failed} failed")
    return "\n".join(rows)
