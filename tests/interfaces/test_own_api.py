"""The own API (``/v1``) through httpx and through the SDK's remote mode."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from glassroom import PolicyError, Sandbox, SandboxClosed, SandboxPathError
from glassroom.audit import verify

from .serve_helpers import Server


@pytest.fixture
def api(serve: Server):
    with httpx.Client(base_url=serve.url, headers=serve.headers("alice"), timeout=60) as c:
        yield c


def _create(api: httpx.Client, **body) -> dict:
    r = api.post("/v1/sandboxes", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def test_create_run_files_audit_destroy(api: httpx.Client, serve: Server) -> None:
    info = _create(api, template="base", timeout_s=60, metadata={"k": "v"}, env={"E1": "x"})
    sid = info["sandbox_id"]
    assert info["backend"] == "namespaces" and info["tier"] == "low"
    assert info["state"] == "running" and 58 < info["timeout_s"] <= 60
    assert "landlock" in info["walls"]

    r = api.post(f"/v1/sandboxes/{sid}/commands", json={"command": "echo $E1; echo e >&2; exit 4"})
    assert r.status_code == 200, r.text
    res = r.json()
    assert (res["exit_code"], res["stdout"], res["stderr"]) == (4, "x\n", "e\n")
    r = api.post(f"/v1/sandboxes/{sid}/commands", json={"argv": ["cat"], "stdin": "in"})
    assert r.json()["stdout"] == "in"
    # a denied exec: blocked, with the rule
    r = api.post(f"/v1/sandboxes/{sid}/commands", json={"argv": ["/usr/bin/perl", "-e", "1"]})
    assert r.json()["exit_code"] == 126
    assert r.json()["blocked"] == [
        {"action": "exec", "target": "/usr/bin/perl", "rule": "tools.allow"}
    ]

    # streaming
    with api.stream(
        "POST",
        f"/v1/sandboxes/{sid}/commands/stream",
        json={"command": "echo one; sleep 0.2; echo two >&2"},
    ) as s:
        assert s.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in s.iter_lines() if line]
    assert events[0]["type"] == "start"
    assert [e["data"] for e in events if e["type"] == "stdout"] == ["one\n"]
    assert [e["data"] for e in events if e["type"] == "stderr"] == ["two\n"]
    assert events[-1]["type"] == "exit" and events[-1]["exit_code"] == 0

    # files
    r = api.put(f"/v1/sandboxes/{sid}/files", params={"path": "/workspace/f.txt"}, content=b"data")
    assert r.status_code == 200 and r.json() == {"path": "/workspace/f.txt", "size": 4}
    assert (
        api.get(f"/v1/sandboxes/{sid}/files", params={"path": "/workspace/f.txt"}).content
        == b"data"
    )
    assert (
        api.post(f"/v1/sandboxes/{sid}/dir", params={"path": "/workspace/sub"}).status_code == 204
    )
    names = {
        e["name"] for e in api.get(f"/v1/sandboxes/{sid}/dir", params={"path": "/workspace"}).json()
    }
    assert names == {"f.txt", "sub"}
    assert (
        api.delete(f"/v1/sandboxes/{sid}/files", params={"path": "/workspace/f.txt"}).status_code
        == 204
    )
    r = api.get(f"/v1/sandboxes/{sid}/files", params={"path": "/workspace/f.txt"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = api.put(f"/v1/sandboxes/{sid}/files", params={"path": "/etc/evil"}, content=b"x")
    assert r.status_code == 403
    assert r.json()["error"]["rule"] == "filesystem.write"

    # timeout, info, list
    r = api.post(f"/v1/sandboxes/{sid}/timeout", json={"timeout_s": 500})
    assert r.status_code == 200 and r.json()["timeout_s"] > 490
    r = api.post(f"/v1/sandboxes/{sid}/timeout", json={"timeout_s": 5000})
    assert r.status_code == 400 and r.json()["error"]["rule"] == "resources.max_runtime_s"
    assert sid in [s["sandbox_id"] for s in api.get("/v1/sandboxes").json()]

    # audit: the blocked exec and the denied write are there, with their rules
    blocked = api.get(f"/v1/sandboxes/{sid}/audit", params={"blocked_only": True}).json()
    assert {r["rule"] for r in blocked} >= {"tools.allow", "filesystem.write"}
    everything = api.get(f"/v1/sandboxes/{sid}/audit").json()
    assert everything[0]["event"] == "sandbox.created"

    # destroy returns the receipt; the sandbox is gone afterwards
    r = api.delete(f"/v1/sandboxes/{sid}")
    assert r.status_code == 200
    receipt = r.json()
    assert receipt["clean"] is True and receipt["sandbox_id"] == sid
    assert api.get(f"/v1/sandboxes/{sid}").status_code == 404
    assert api.post(f"/v1/sandboxes/{sid}/commands", json={"argv": ["true"]}).status_code == 404
    # its audit trail outlives it
    assert api.get(f"/v1/sandboxes/{sid}/audit").json()[-1]["event"] == "sandbox.destroyed"
    assert verify(serve.cfg.audit_log).ok


def test_policy_in_the_request_and_its_errors(api: httpx.Client) -> None:
    toml = '[tools]\nallow = ["sh", "echo"]\n[resources]\nmax_runtime_s = 30\n'
    info = _create(api, policy=toml, timeout_s=10)
    try:
        assert info["max_runtime_s"] == 30 and info["template"] is None
        r = api.post(f"/v1/sandboxes/{info['sandbox_id']}/commands", json={"argv": ["ls"]})
        assert r.json()["exit_code"] in (126, 127)
    finally:
        api.delete(f"/v1/sandboxes/{info['sandbox_id']}")
    for body, status, rule in (
        ({"policy": "[filesystem]\nread = ['/']\n"}, 400, None),
        ({"policy": {"filesystem": {"raed": []}}}, 400, None),
        ({"policy": "risk = 'high'\n", "backend": "namespaces"}, 400, "risk"),
        ({"template": "nope"}, 404, "template"),
        ({"timeout_s": 9999}, 400, "resources.max_runtime_s"),
        ({"timeout_s": -1}, 422, None),
        ({"surprise": 1}, 422, None),
    ):
        r = api.post("/v1/sandboxes", json=body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["message"]
        if rule:
            assert err["rule"] == rule, (body, err)


def test_auth_tenants_cap_and_size_limit(serve: Server) -> None:
    with httpx.Client(base_url=serve.url, timeout=60) as c:
        assert c.get("/v1/sandboxes").status_code == 401
        assert c.get("/v1/sandboxes", headers={"X-API-Key": "e2b_" + "0" * 40}).status_code == 401
        assert c.get("/v1/health").json()["status"] == "ok"
        # Bearer works too
        r = c.get("/v1/sandboxes", headers={"Authorization": f"Bearer {serve.keys['bob']}"})
        assert r.status_code == 200

        a = c.post("/v1/sandboxes", json={}, headers=serve.headers("alice")).json()["sandbox_id"]
        try:
            bob = serve.headers("bob")
            for method, path in (
                ("GET", f"/v1/sandboxes/{a}"),
                ("DELETE", f"/v1/sandboxes/{a}"),
                ("GET", f"/v1/sandboxes/{a}/audit"),
                ("GET", f"/v1/sandboxes/{a}/dir?path=/workspace"),
            ):
                assert c.request(method, path, headers=bob).status_code == 404
            r = c.post(f"/v1/sandboxes/{a}/commands", json={"argv": ["true"]}, headers=bob)
            assert r.status_code == 404
            assert a not in [s["sandbox_id"] for s in c.get("/v1/sandboxes", headers=bob).json()]
        finally:
            c.delete(f"/v1/sandboxes/{a}", headers=serve.headers("alice"))

        carol = serve.headers("carol")  # max 2 sandboxes
        made = [c.post("/v1/sandboxes", json={}, headers=carol) for _ in range(3)]
        assert [r.status_code for r in made] == [201, 201, 429]
        assert made[2].json()["error"]["rule"] == "tenant.max_sandboxes"
        for r in made[:2]:
            c.delete(f"/v1/sandboxes/{r.json()['sandbox_id']}", headers=carol)

        big = b"x" * (serve.cfg.max_request_bytes + 1)
        r = c.put(
            "/v1/sandboxes/sb-x/files?path=/workspace/a",
            content=big,
            headers=serve.headers("alice"),
        )
        assert r.status_code == 413 and r.json()["error"]["rule"] == "serve.max_request_bytes"


def test_sandbox_outlives_the_request_thread_that_created_it(api: httpx.Client) -> None:
    """bwrap's --die-with-parent fires when the spawning *thread* exits; sandboxes are
    made on the service's long-lived owner threads, never on a request's worker."""
    import anyio.to_thread  # noqa: F401  (the request workers are anyio's: they idle out at 10 s)

    info = _create(api, timeout_s=60)
    sid = info["sandbox_id"]
    try:
        # every thread that served the create request has idled out by now
        time.sleep(11)
        names = [t.name for t in threading.enumerate()]
        assert any(n.startswith("glassroom-owner") for n in names)
        r = api.post(f"/v1/sandboxes/{sid}/commands", json={"argv": ["echo", "alive"]})
        assert r.status_code == 200 and r.json()["stdout"] == "alive\n"
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_approvals_api(api: httpx.Client, serve: Server) -> None:
    assert api.get("/v1/approvals").json() == []
    r = api.post("/v1/approvals/ap-nope", json={"decision": "approve"})
    assert r.status_code == 404
    info = _create(api)
    try:
        ap = serve.service.approvals.request(
            info["sandbox_id"], "connect", "example.com:443", "network.ask"
        )
        assert [a["approval_id"] for a in api.get("/v1/approvals").json()] == [ap.approval_id]
        other = httpx.get(f"{serve.url}/v1/approvals", headers=serve.headers("bob")).json()
        assert other == []
        r = api.post(f"/v1/approvals/{ap.approval_id}", json={"decision": "deny"})
        assert r.status_code == 200 and r.json()["state"] == "denied"
        assert serve.service.approvals.wait(ap.approval_id, 1).state == "denied"
        r = api.post(f"/v1/approvals/{ap.approval_id}", json={"decision": "approve"})
        assert r.status_code == 409
    finally:
        api.delete(f"/v1/sandboxes/{info['sandbox_id']}")


def test_sdk_remote_mode_has_the_same_api(serve: Server) -> None:
    with Sandbox(url=serve.url, api_key=serve.keys["alice"]) as sb:
        assert sb.id.startswith("sb-") and sb.backend == "namespaces"
        r = sb.run(["python3", "-c", "print(6*7)"])
        assert (r.exit_code, r.stdout) == (0, "42\n")
        r = sb.run("echo nope > /etc/x")
        assert r.exit_code != 0 and "/etc/x" in r.stderr
        r = sb.run(["/usr/bin/perl"])
        assert r.exit_code == 126 and r.blocked[0].rule == "tools.allow"
        sb.files.write("/workspace/a.py", "print('hi')")
        assert sb.files.read_text("/workspace/a.py") == "print('hi')"
        assert [e.name for e in sb.files.list("/workspace")] == ["a.py"]
        assert sb.files.exists("/workspace/a.py")
        with pytest.raises(SandboxPathError) as ei:
            sb.files.write("/etc/evil", "x")
        assert ei.value.rule == "filesystem.write"
        receipt = sb.destroy()
        assert receipt.clean
    with pytest.raises(SandboxClosed):
        sb.run(["true"])
    with pytest.raises(PolicyError):
        Sandbox("[filesystem]\nread = ['/']\n", url=serve.url, api_key=serve.keys["alice"])
