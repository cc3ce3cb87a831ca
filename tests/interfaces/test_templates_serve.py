"""A serve template whose policy names a store template (docs/templates.md).

Harmless: a sandbox of the serve template runs in the store template's tree.
Malicious: writing into it is refused, and a tool the template lacks is a
clear 400 at create naming ``tools.allow[i]``, never a sandbox on the host's
/usr.  The own API, on every tier.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from glassroom.policy import validate_policy
from glassroom.templates import import_oci
from glassroom.templates.testing import busybox_entries, docker_save_tar, scratch_store

from .serve_helpers import Server, serving_e2b

RISK = {"namespaces": "low", "gvisor": "medium", "microvm": "high"}


@pytest.fixture(scope="module")
def served() -> Iterator[Server]:
    entries = busybox_entries(("sh", "cat", "echo"))
    entries["etc/os-release"] = b"ID=busy\n"
    with scratch_store() as (store, base):
        import_oci(docker_save_tar(base / "img.tar", entries), store, "busy")
        with serving_e2b(base / "data") as srv:
            for tier, risk in RISK.items():
                srv.cfg.templates[f"busy-{tier}"] = validate_policy(
                    {"risk": risk, "template": "busy", "tools": {"allow": ["sh", "cat", "echo"]}})
            srv.cfg.templates["busy-python"] = validate_policy(
                {"template": "busy", "tools": {"allow": ["sh", "python3"]}})
            yield srv


def test_a_serve_template_runs_in_the_store_template(served: Server, backend: str) -> None:
    with httpx.Client(base_url=served.url, headers=served.headers(), timeout=120) as c:
        r = c.post("/v1/sandboxes", json={"template": f"busy-{backend}", "timeout_s": 60})
        assert r.status_code == 201, r.text
        sid = r.json()["sandbox_id"]
        try:
            r = c.post(f"/v1/sandboxes/{sid}/commands",
                       json={"argv": ["sh", "-c", "cat /etc/os-release; echo x > /etc/f"]})  # fmt: skip
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["stdout"] == "ID=busy\n"
            assert out["exit_code"] != 0 and out["stderr"]  # read-only: refused
        finally:
            c.delete(f"/v1/sandboxes/{sid}")
    assert not served.errors(), served.errors()


def test_a_tool_the_template_lacks_is_a_clear_refusal(served: Server) -> None:
    with httpx.Client(base_url=served.url, headers=served.headers(), timeout=60) as c:
        r = c.post("/v1/sandboxes", json={"template": "busy-python"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["rule"] == "tools.allow[1]"
    assert "'python3' not found in the template" in err["message"]
