"""E2B per-sandbox network options (``network=``, ``allow_internet_access``,
``update_network``) with the real ``e2b`` SDK against a real ``glassroom serve``.

Every destination is a loopback HTTP server of this test (127.0.0.1 and
127.0.0.2), reached through the sandbox's egress proxy: nothing leaves the
machine.  The template ``net`` allows exactly those two; per-sandbox options
may only narrow it.  Each pair: the harmless request goes through, the refused
one gets the proxy's 403 and an audit record naming the rule.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from glassroom.interfaces.http._config import builtin_templates
from glassroom.policy import default_policy, validate_policy

from .serve_helpers import Server, serving_e2b

e2b = pytest.importorskip("e2b")

FETCH = """import sys, urllib.request
try:
    print(urllib.request.urlopen("http://%s/", timeout=10).read().decode())
except Exception as exc:
    print("refused:", exc)
    sys.exit(3)
"""


class _Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.server.server_address[0].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str, str]]:
    """A serve whose template ``net`` allows two loopback servers: (server, A, B)."""
    servers = [http.server.ThreadingHTTPServer((ip, 0), _Echo) for ip in ("127.0.0.1", "127.0.0.2")]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    a, b = (f"{s.server_address[0]}:{s.server_address[1]}" for s in servers)
    pol = default_policy().model_dump()
    pol["network"]["allow"] = [a, b]
    pol["resources"]["max_runtime_s"] = 600.0
    templates = {**builtin_templates(), "net": validate_policy(pol)}
    try:
        with serving_e2b(tmp_path_factory.mktemp("serve"), templates=templates) as srv:
            yield srv, a, b
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


def fetch(sb: Any, target: str) -> str:
    """What the sandbox gets from ``http://target/`` (through its proxy)."""
    sb.files.write("/tmp/fetch.py", FETCH % target)
    try:
        return str(sb.commands.run("python3 /tmp/fetch.py", timeout=30).stdout.strip())
    except e2b.CommandExitException as exc:
        assert exc.exit_code == 3, exc.stderr
        return str(exc.stdout.strip())


def records(srv: Server, sandbox_id: str, event: str) -> list[dict[str, Any]]:
    lines = Path(srv.cfg.audit_log).read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    return [r for r in recs if r.get("sandbox") == sandbox_id and r.get("event") == event]


def denied(srv: Server, sandbox_id: str, target: str) -> dict[str, Any]:
    host, _, port = target.partition(":")
    hits = [
        r
        for r in records(srv, sandbox_id, "network.request")
        if r["decision"] == "deny" and r["details"]["host"] == host
        and r["details"]["port"] == int(port)
    ]  # fmt: skip
    assert hits, f"no denied network.request to {target}"
    return hits[-1]


@pytest.fixture
def make(net: tuple[Server, str, str]) -> Iterator[Any]:
    made: list[Any] = []

    def create(template: str = "net", **kw: Any) -> Any:
        sb = e2b.Sandbox.create(template, timeout=120, **kw)
        made.append(sb)
        return sb

    yield create
    for sb in made:
        try:
            sb.kill()
        except Exception:
            pass


def test_allow_out_over_deny_all(net: tuple[Server, str, str], make: Any) -> None:
    srv, a, b = net
    sb = make(network={"deny_out": lambda ctx: [ctx.all_traffic], "allow_out": [a]})
    assert fetch(sb, a) == "127.0.0.1"  # allowOut takes precedence over denyOut
    assert fetch(sb, b) == "refused: HTTP Error 403: Forbidden"
    rec = denied(srv, sb.sandbox_id, b)
    assert rec["rule"] == "e2b.network.denyOut[0]"
    assert rec["details"]["reason"] == "the sandbox's network options deny all traffic"
    (made,) = records(srv, sb.sandbox_id, "network.policy_changed")
    assert made["details"] == {
        "at": "create",
        "before": None,
        "after": {"allowOut": [a], "denyOut": ["0.0.0.0/0"]},
    }


def test_deny_out_one_address(net: tuple[Server, str, str], make: Any) -> None:
    srv, a, b = net
    sb = make(network={"deny_out": ["127.0.0.2"]})
    assert fetch(sb, a) == "127.0.0.1"
    assert fetch(sb, b) == "refused: HTTP Error 403: Forbidden"
    assert denied(srv, sb.sandbox_id, b)["rule"] == "e2b.network.denyOut[0]"
    info = sb.get_info()
    assert info.network == {"allow_out": [], "deny_out": ["127.0.0.2"]}


def test_internet_access_false(net: tuple[Server, str, str], make: Any) -> None:
    srv, a, _ = net
    sb = make(allow_internet_access=False)
    assert fetch(sb, a) == "refused: HTTP Error 403: Forbidden"
    assert denied(srv, sb.sandbox_id, a)["rule"] == "e2b.allow_internet_access"


def test_update_network_is_live_and_audited(net: tuple[Server, str, str], make: Any) -> None:
    srv, a, b = net
    sb = make()
    assert fetch(sb, b) == "127.0.0.2"
    sb.update_network({"deny_out": ["127.0.0.2"]})
    assert fetch(sb, b) == "refused: HTTP Error 403: Forbidden"
    assert fetch(sb, a) == "127.0.0.1"
    sb.update_network({})  # omitted fields are cleared
    assert fetch(sb, b) == "127.0.0.2"
    changes = [r["details"] for r in records(srv, sb.sandbox_id, "network.policy_changed")]
    assert changes == [
        {
            "at": "update",
            "before": {"allowOut": [], "denyOut": []},
            "after": {"allowOut": [], "denyOut": ["127.0.0.2"]},
            "open_connections": "kept",
        },
        {
            "at": "update",
            "before": {"allowOut": [], "denyOut": ["127.0.0.2"]},
            "after": {"allowOut": [], "denyOut": []},
            "open_connections": "kept",
        },
    ]


def test_widening_is_refused(net: tuple[Server, str, str], make: Any) -> None:
    srv, a, _ = net
    with pytest.raises(e2b.SandboxException) as exc:
        make(network={"allow_out": ["127.0.0.3"]})
    assert str(exc.value) == (
        "403: allowOut '127.0.0.3' is not allowed by template 'net' (network.allow); "
        "per-sandbox options can only narrow the template's network "
        "(rule e2b.network.allowOut[0])"
    )
    sb = make(network={"deny_out": ["0.0.0.0/0"]})
    with pytest.raises(e2b.SandboxException) as exc:
        sb.update_network({"allow_out": [a, "127.0.0.3:80"]})
    assert "allowOut '127.0.0.3:80' is not allowed by template 'net'" in str(exc.value)
    assert str(exc.value).endswith("(rule e2b.network.allowOut[1])")
    assert fetch(sb, a) == "refused: HTTP Error 403: Forbidden"  # the old rules stand
    assert records(srv, sb.sandbox_id, "network.policy_changed")[-1]["details"]["at"] == "create"


def test_template_without_network(net: tuple[Server, str, str], make: Any) -> None:
    _, a, _ = net
    with pytest.raises(e2b.SandboxException) as exc:
        make("base", network={"allow_out": [a]})
    assert f"allowOut '{a}': template 'base' has no network" in str(exc.value)
    assert str(exc.value).endswith("(rule e2b.network.allowOut[0])")
    with pytest.raises(e2b.SandboxException) as exc:
        make("base", allow_internet_access=True)
    assert str(exc.value).endswith("(rule e2b.allow_internet_access)")
    sb = make("base", network={"deny_out": ["127.0.0.2"]})  # narrowing nothing is fine
    assert fetch(sb, a).startswith("refused:")  # no network at all
    with pytest.raises(e2b.SandboxException) as exc:
        sb.update_network({"allow_out": [a]})
    assert "template 'base' has no network" in str(exc.value)


def test_unsupported_options_are_named(net: tuple[Server, str, str], make: Any) -> None:
    with pytest.raises(e2b.SandboxException) as exc:
        make(network={"mask_request_host": "x.example.com"})
    assert str(exc.value).startswith("400: network.maskRequestHost: not supported")
    with pytest.raises(e2b.SandboxException) as exc:
        make(network={"allow_public_traffic": True})
    assert "(rule e2b.network.allowPublicTraffic)" in str(exc.value)
    with pytest.raises(e2b.SandboxException) as exc:
        make(network={"deny_out": ["0.0.0.0/0", "https://example.com"]})
    assert "write a host, not a URL (rule e2b.network.denyOut[1])" in str(exc.value)


def test_fork_keeps_no_wider_network(net: tuple[Server, str, str], make: Any) -> None:
    _, a, b = net
    sb = make(network={"deny_out": ["127.0.0.2"]})
    with pytest.raises(e2b.SandboxException) as exc:
        sb.fork()
    assert "has per-sandbox network options, which a fork would not keep" in str(exc.value)
    sb.update_network({})
    (child,) = sb.fork()
    try:
        assert fetch(child, a) == "127.0.0.1"
        assert fetch(child, b) == "127.0.0.2"
    finally:
        child.kill()


def test_options_survive_pause_and_resume(net: tuple[Server, str, str], make: Any) -> None:
    srv, a, b = net
    sb = make(network={"deny_out": ["127.0.0.2"]})
    assert sb.pause()
    resumed = e2b.Sandbox.connect(sb.sandbox_id, timeout=120)  # resumes it
    assert fetch(resumed, a) == "127.0.0.1"
    assert fetch(resumed, b) == "refused: HTTP Error 403: Forbidden"
    assert denied(srv, sb.sandbox_id, b)["rule"] == "e2b.network.denyOut[0]"


def test_snapshot_create_takes_no_options(net: tuple[Server, str, str], make: Any) -> None:
    sb = make()
    snap = sb.create_snapshot()
    with pytest.raises(e2b.SandboxException) as exc:
        make(snap.snapshot_id, network={"deny_out": ["127.0.0.2"]})
    assert str(exc.value) == (
        "400: network: a sandbox made from a snapshot has the snapshot's policy; "
        "per-sandbox network options are not applied to it (rule e2b.network)"
    )


@pytest.mark.parametrize(
    "spelling",
    ["93.184.215.14", "::ffff:93.184.215.14", "::ffff:5db8:d70e", "64:ff9b::5db8:d70e"],
)
def test_deny_out_holds_for_every_spelling_of_the_address(spelling: str) -> None:
    """A name the template allows that resolves (AAAA, under the sandbox's
    control) to an IPv6 form of a denied IPv4 address is still denied; the
    same name at another address is left to the template (allowed)."""
    from glassroom.egress import Request
    from glassroom.interfaces.e2b import _network

    p = default_policy().model_dump()
    p["network"]["allow"] = ["*.example.com"]
    overlay = _network.parse({"denyOut": ["93.184.215.14"]}, None)
    decider = _network.decider_for(validate_policy(p), overlay)
    req = Request(host="x.example.com", port=443, scheme="https")
    got = decider.check_address(req, spelling, False)
    assert (got.action, got.rule) == ("deny", "e2b.network.denyOut[0]")
    other = decider.check_address(req, "93.184.215.15", False)
    assert other.action != "deny" or other.rule != "e2b.network.denyOut[0]"
