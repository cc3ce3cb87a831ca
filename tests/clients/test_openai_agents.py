"""openai-agents' ``SandboxAgent`` with its E2B sandbox client, unmodified,
against a real ``glassroom serve`` on 127.0.0.1, on every tier.

The model is the SDK's own ``agents.testing.ScriptedModel``: one
``exec_command`` call (the Shell capability's tool), then a final message; no
request leaves the machine.  At the end of the run the E2B session archives the
workspace inside the sandbox (``tar -C /workspace -cf - . | base64 -w0``), which
needs ``tar`` and ``base64`` in serve's ``base`` template: the test reads the
file the agent wrote back out of that archive.

Two create options are the client's own defaults that glassroom refuses rather
than pretends (``test_the_client_defaults_are_refused_clearly``): internet
access, which the template's policy decides, and ``auto_resume``, which serve
does not do.  So the runs say ``allow_internet_access=False`` and
``on_timeout="kill"``; the framework itself is unchanged.
"""

from __future__ import annotations

import asyncio
import io
import logging
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("agents", reason="openai-agents (the [test] extra) is not installed")

from agents import RunConfig, Runner, set_tracing_disabled
from agents.extensions.sandbox.e2b import (
    E2BSandboxClient,
    E2BSandboxClientOptions,
)
from agents.items import ToolCallOutputItem
from agents.run_config import SandboxRunConfig
from agents.sandbox import SandboxAgent
from agents.sandbox.snapshot import LocalSnapshotSpec
from agents.testing import ScriptedModel, assistant_message, function_call
from e2b.exceptions import SandboxException

from glassroom.audit import read_records
from glassroom.interfaces.http._config import builtin_templates
from glassroom.policy import validate_policy
from interfaces.serve_helpers import Server, serving_e2b

from .conftest import RISK, need_store_template

set_tracing_disabled(True)  # traces would go to OpenAI's servers

#: How a write into the system tree fails, per tier: a read-only bind on
#: namespaces; on gVisor, /etc is root's and the sandbox is not.
WRITE_REFUSED = {"namespaces": "Read-only file system", "gvisor": "Permission denied",
                 "microvm": "Read-only file system"}  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving_e2b(tmp_path_factory.mktemp("serve")) as srv:
        yield srv


@pytest.fixture(params=["host", "store"])
def flavor(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def on_tier(flavor: str, served: Server, backend: str) -> Iterator[Server]:
    """serve's ``base`` (the SDK's default template) on ``backend``'s tier: its
    built-in policy on the host's /usr ("host"), or the same policy in the
    built-in store template ``base``, Debian's tree ("store")."""
    base = builtin_templates()["base"].model_dump()
    base["risk"] = RISK[backend]
    if flavor == "store":
        need_store_template("base")
        base["template"] = "base"
    saved = served.cfg.templates["base"]
    served.cfg.templates["base"] = validate_policy(base)
    try:
        yield served
    finally:
        served.cfg.templates["base"] = saved


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())


def _options(**kw: Any) -> E2BSandboxClientOptions:
    kw.setdefault("allow_internet_access", False)
    kw.setdefault("on_timeout", "kill")
    return E2BSandboxClientOptions(sandbox_type="e2b", timeout=300, **kw)


def _run(
    cmd: str,
    snapshots: Path,
    options: E2BSandboxClientOptions | None = None,
    resume: dict[str, Any] | None = None,
) -> Any:
    """One run: the agent runs ``cmd`` with exec_command, then answers "done".
    ``resume``: the sandbox state an earlier run ended with (what its RunState
    carries), to go on from.  Returns the result and the openai.agents warnings
    of the run."""
    model = ScriptedModel(
        [
            [function_call("exec_command", {"cmd": cmd}, call_id="call-1")],
            [assistant_message("done")],
        ]
    )
    agent = SandboxAgent(name="worker", instructions="Use the shell.", model=model)
    client = E2BSandboxClient()
    if resume is not None:
        state = client.deserialize_session_state(resume["session_state"])
        sandbox = SandboxRunConfig(client=client, session_state=state)
    else:
        sandbox = SandboxRunConfig(
            client=client,
            options=options or _options(),
            snapshot=LocalSnapshotSpec(base_path=snapshots),
        )
    config = RunConfig(sandbox=sandbox)
    warned = _Warnings()
    log = logging.getLogger("openai.agents")
    log.addHandler(warned)
    try:
        result = asyncio.run(Runner.run(agent, "Write the notes.", run_config=config))
    finally:
        log.removeHandler(warned)
    assert model.remaining_steps == 0
    return result, warned.seen


def _tool_output(result: Any) -> str:
    outs = [i.output for i in result.new_items if isinstance(i, ToolCallOutputItem)]
    assert len(outs) == 1, outs
    return str(outs[0])


def _archive(snapshots: Path) -> dict[str, bytes]:
    """The workspace archive the session made at the end of the run (its
    LocalSnapshot: one tar per session), as {path: content} of its files."""
    tars = list(snapshots.glob("*.tar"))
    assert len(tars) == 1, tars
    with tarfile.open(fileobj=io.BytesIO(tars[0].read_bytes())) as tf:
        return {
            m.name.removeprefix("./"): tf.extractfile(m).read()  # type: ignore[union-attr]
            for m in tf.getmembers()
            if m.isfile()
        }


def last_created(served: Server) -> dict[str, Any]:
    """The details of the newest ``sandbox.created`` record in serve's audit log."""
    made = [r for r in read_records(served.cfg.audit_log) if r["event"] == "sandbox.created"]
    assert made, "no sandbox.created record"
    return dict(made[-1]["details"])


def _live(served: Server) -> list[Any]:
    r = httpx.get(f"{served.url}/v1/sandboxes", headers=served.headers(), timeout=30)
    assert r.status_code == 200, r.text
    return list(r.json())


def test_a_sandbox_agent_run_writes_its_file_and_archives_the_workspace(
    on_tier: Server, backend: str, flavor: str, tmp_path: Path
) -> None:
    cmd = "mkdir -p notes && printf 'hello from the agent\\n' > notes/out.txt && wc -c notes/out.txt && pwd"
    result, warned = _run(cmd, tmp_path)

    assert result.final_output == "done"
    out = _tool_output(result)
    assert "Process exited with code 0" in out
    assert "21 notes/out.txt\n/workspace\n" in out
    # No "Failed to clean up sandbox resources after run": the archive worked ...
    assert warned == []
    # ... and holds what the agent wrote, made by tar inside the sandbox.
    assert _archive(tmp_path)["notes/out.txt"] == b"hello from the agent\n"
    created = last_created(on_tier)
    assert created["backend"] == backend  # never a silent fallback
    assert str(created.get("template")).startswith("base@sha256:") == (flavor == "store")
    assert _live(on_tier) == []  # the session killed its sandbox
    assert not on_tier.errors(), on_tier.errors()


def test_a_second_run_goes_on_from_the_archived_workspace(on_tier: Server, tmp_path: Path) -> None:
    """The first run's sandbox is gone when it ends; resuming its session makes
    a new sandbox and restores the archive into it (the SDK writes the tar with
    the files API and unpacks it with ``tar -xf`` inside)."""
    first, warned = _run("echo first > keep.txt", tmp_path)
    assert warned == []
    state = first._sandbox_resume_state  # what the run's RunState carries on
    assert isinstance(state, dict)
    second, warned = _run("cat keep.txt && echo second >> keep.txt", tmp_path, resume=state)

    assert second.final_output == "done"
    out = _tool_output(second)
    assert "Process exited with code 0\nOutput:\nfirst\n" in out, out
    assert warned == []
    assert _archive(tmp_path)["keep.txt"] == b"first\nsecond\n"
    assert _live(on_tier) == []
    assert not on_tier.errors(), on_tier.errors()


def test_the_agent_cannot_write_outside_the_workspace_or_reach_the_host(
    on_tier: Server, backend: str, tmp_path: Path
) -> None:
    """Harmless: a write in the workspace works.  Malicious: a write into the
    system tree, and a connection to the server glassroom serve itself listens
    on (127.0.0.1 of the host), are refused inside the sandbox."""
    port = int(on_tier.url.rsplit(":", 1)[1])
    cmd = (
        "echo ok > mine.txt && cat mine.txt; "
        "{ echo pwned > /etc/evil.txt; } 2>&1; echo write=$?; "
        f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5)\" "
        "2>&1 | tail -n 1"
    )
    result, warned = _run(cmd, tmp_path)

    assert result.final_output == "done"
    out = _tool_output(result)
    assert "ok\n" in out
    # exec_command runs the command with sh (dash): its message, exit status 2
    assert f"sh: 1: cannot create /etc/evil.txt: {WRITE_REFUSED[backend]}\nwrite=2\n" in out, out
    assert "ConnectionRefusedError: [Errno 111] Connection refused\n" in out, out
    assert warned == []
    files = _archive(tmp_path)
    assert files["mine.txt"] == b"ok\n"
    assert "evil.txt" not in str(files)
    assert not on_tier.errors(), on_tier.errors()


def test_the_client_defaults_are_refused_clearly(served: Server, tmp_path: Path) -> None:
    """E2BSandboxClientOptions' defaults ask for internet access and for
    auto-resume after a pause; serve's ``base`` has no network, and serve does
    not resume on traffic.  Each is a clear 4xx at create, never a sandbox that
    silently lacks what the client asked for."""
    with pytest.raises(SandboxException) as exc:
        _run("true", tmp_path, E2BSandboxClientOptions(sandbox_type="e2b", on_timeout="kill"))
    assert str(exc.value) == (
        "403: allow_internet_access: template 'base' has no network (network.allow); "
        "the operator must give a template whose [network] allows the hosts it needs "
        "(rule e2b.allow_internet_access)"
    )
    with pytest.raises(SandboxException) as exc:
        _run(
            "true",
            tmp_path,
            E2BSandboxClientOptions(sandbox_type="e2b", allow_internet_access=False),
        )
    assert str(exc.value) == (
        "400: autoResume: glassroom does not resume a paused sandbox on traffic; "
        "resume it with connect() (leave auto_resume off) (rule autoResume)"
    )
    assert _live(served) == []
    assert not served.errors(), served.errors()
