"""The drill's credential-proxy and tunnel attempts (issue 13, item 1), on every tier.

Each runs its harmless twin and its attack in fresh sandboxes through the
real egress proxy, with the drill's loopback servers: the twin must work,
the attack must be blocked with the exact outcome, and a ``deny`` record
must name the rule.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from glassroom.audit import verify
from glassroom.drill import _one
from glassroom.drill._network import network_attempts, setup_net
from glassroom.policy import default_policy

BACKENDS = ["namespaces", "gvisor", "microvm"]  # microvm under TCG here (conftest allows it)
NAMES = ["placeholder-exfiltration", "credential-wrong-port", "credential-other-header",
         "credential-echo", "tunnel-not-tls"]  # fmt: skip


@pytest.fixture(scope="module")
def net() -> Iterator[dict[str, Any]]:
    n, cleanup = setup_net()
    yield n
    cleanup()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_credential_attempt(name: str, backend: str, net: dict[str, Any], tmp_path: Path) -> None:
    att = next(a for a in network_attempts(net) if a.name == name)
    log = tmp_path / "audit.jsonl"
    res = _one(att, default_policy(), backend, log, None)
    assert res.twin_ok, f"harmless twin of {name} failed: {res.detail}"
    assert res.blocked, f"{name} was NOT blocked: {res.detail}"
    assert res.audited, f"{name}: no deny record with rule {att.rule}"
    assert net["secret"] not in log.read_text()
    assert verify(log).ok
