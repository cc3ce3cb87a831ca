"""inspect-ai evals whose samples run in glassroom sandboxes (docs/inspect.md).

Each test runs a real ``inspect_ai.eval`` of a one-sample Task with inspect's
scripted model (``mockllm/model`` with ``custom_outputs``): its tool calls are
real ``bash`` and file-writing tools executed through the ``glassroom``
provider that the ``inspect_ai`` entry point registers.  What the sample did is
checked where only a sandbox could have put it: the glassroom audit log holds
the command and the file write, and the tool saw uid 1000 in /workspace.  Each
harmless action has its malicious twin (a write outside the policy, a refused
program, root), refused with the exception inspect's contract names and a deny
record in the audit log.  Nothing here talks to a network: the model is scripted.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("inspect_ai", reason="glassroom[inspect] is not installed")

from inspect_ai import Task, eval
from inspect_ai.dataset import Sample
from inspect_ai.log import EvalLog
from inspect_ai.model import ChatMessageTool, ModelOutput, ModelUsage, get_model
from inspect_ai.scorer import CORRECT, INCORRECT, Score, Scorer, Target, scorer
from inspect_ai.scorer import accuracy as accuracy_metric
from inspect_ai.solver import Generate, Solver, TaskState, generate, solver, use_tools
from inspect_ai.tool import Tool, bash, python, tool
from inspect_ai.util import (
    OutputLimitExceededError,
    SandboxUserUnsupportedError,
    sandbox,
)
from inspect_ai.util._sandbox.limits import override_max_read_file_size

from conftest import assert_blocked, records
from glassroom.interfaces.inspect_ai import GlassroomSandboxConfig, GlassroomSandboxEnvironment

DENIED_PATH = "/usr/glassroom-inspect-denied"
DENIED_TOOL = "od"  # on the host, not in the default policy's tools.allow


@pytest.fixture(autouse=True)
def inspect_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """inspect's logs, traces and caches go to tmp_path, never the user's home."""
    home = tmp_path / "inspect"
    home.mkdir()
    monkeypatch.setenv("INSPECT_LOG_DIR", str(home / "logs"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))
    monkeypatch.setenv("INSPECT_DISPLAY", "none")
    yield home


@tool
def write_note() -> Tool:
    async def execute(path: str, text: str) -> str:
        """Write a file in the sandbox.

        Args:
          path: Where to write.
          text: What to write.
        """
        await sandbox().write_file(path, text)
        return f"wrote {path}"

    return execute


def _sandbox_id() -> str:
    return sandbox().as_type(GlassroomSandboxEnvironment).sandbox.id


@scorer(metrics=[accuracy_metric()])
def note_in_sandbox() -> Scorer:
    """Correct when the sample's note is in its sandbox; records which sandbox."""

    async def score(state: TaskState, target: Target) -> Score:
        text = await sandbox().read_file("/workspace/out/note.txt")
        return Score(value=CORRECT if target.text in text else INCORRECT, answer=text,
                     metadata={"sandbox": _sandbox_id()})  # fmt: skip

    return score


def _scripted(out: ModelOutput) -> ModelOutput:
    # With usage given, mockllm does not count tokens with tiktoken, whose
    # encodings it would otherwise download: the eval stays off the network.
    out.usage = ModelUsage(input_tokens=1, output_tokens=1, total_tokens=2)
    return out


def _call(tool_name: str, **args: Any) -> ModelOutput:
    return _scripted(ModelOutput.for_tool_call("mockllm/model", tool_name, args))


def _run(task: Task, outputs: list[ModelOutput], log_dir: Path) -> EvalLog:
    model = get_model("mockllm/model", custom_outputs=outputs)
    [log] = eval(task, model=model, log_dir=str(log_dir), display="none", max_samples=1)
    assert log.status == "success", log.error
    assert log.samples is not None and len(log.samples) == 1
    return log


def test_eval_runs_its_tool_calls_in_a_glassroom_sandbox(
    backend: str, audit_log: Path, inspect_home: Path
) -> None:
    cfg = GlassroomSandboxConfig(backend=backend, audit_log=str(audit_log))
    given = Sample(input="write the note", target="glassroom-note", files={"given.txt": "given"})
    task = Task(
        dataset=[given],
        solver=[use_tools(bash(timeout=60), python(timeout=60), write_note()), generate()],
        scorer=note_in_sandbox(),
        sandbox=("glassroom", cfg),
    )
    outputs = [
        _call("bash", command="id -u; pwd; cat given.txt"),
        _call("python", code="import os; print(os.getuid() * 2)"),
        # harmless: a note under the workspace (its parent made on the way) ...
        _call("write_note", path="out/note.txt", text="glassroom-note"),
        # ... malicious: a write outside the policy's writable paths
        _call("write_note", path=DENIED_PATH, text="x"),
        _scripted(ModelOutput.from_content("mockllm/model", "done")),
    ]
    log = _run(task, outputs, inspect_home / "logs")
    sample = log.samples[0]  # type: ignore[index]
    tools = [m for m in sample.messages if isinstance(m, ChatMessageTool)]
    assert [t.function for t in tools] == ["bash", "python", "write_note", "write_note"]
    # The bash call ran as the sandbox's user, in its workspace, with the sample's file.
    assert tools[0].error is None
    assert tools[0].text.split() == ["1000", "/workspace", "given"]
    assert tools[1].error is None and tools[1].text.strip() == "2000"
    assert tools[2].error is None and tools[2].text == "wrote out/note.txt"
    # The denied write reached the model as inspect's "permission" tool error.
    assert tools[3].error is not None and tools[3].error.type == "permission", tools[3]
    assert DENIED_PATH in tools[3].error.message
    assert not Path(DENIED_PATH).exists()
    score = sample.scores["note_in_sandbox"]  # type: ignore[index]
    assert score.value == CORRECT and score.answer == "glassroom-note"
    # The audit log of that sandbox holds what the sample did, and the refusal.
    sid = score.metadata["sandbox"]  # type: ignore[index]
    recs = records(audit_log, sid)
    events = [r["event"] for r in recs]
    assert events[0] == "sandbox.created" and events[-1] == "sandbox.destroyed"
    started = [r["details"]["argv"] for r in recs if r["event"] == "command.started"]
    assert ["bash", "--login", "-c", "id -u; pwd; cat given.txt"] in started
    writes = [r["details"]["path"] for r in recs if r["event"] == "file.write"]
    assert "/workspace/given.txt" in writes and "/workspace/out/note.txt" in writes
    # (the gVisor tier adds its --strace view of refusals inside: "blocked" is ours)
    hits = assert_blocked(audit_log, sid, "filesystem.write")
    assert [h["details"]["target"] for h in hits if h["event"] == "blocked"] == [DENIED_PATH]


@solver
def contract_probe(seen: dict[str, Any]) -> Solver:
    """Each pair of inspect's contract, recorded for the test to check."""

    async def solve(state: TaskState, generate: Generate) -> TaskState:
        sb = sandbox()
        seen["sandbox"] = _sandbox_id()
        await sb.write_file("sub/crlf.txt", b"a\r\nb")
        r = await sb.exec(["cat"], input="piped", cwd="sub")
        seen["stdin"] = (r.success, r.stdout)
        r = await sb.exec(["sh", "-c", 'pwd; echo "$GR_X"'], cwd="sub", env={"GR_X": "1"})
        seen["cwd_env"] = r.stdout.split()
        seen["crlf"] = await sb.read_file("sub/crlf.txt")
        seen["bytes"] = await sb.read_file("sub/crlf.txt", text=False)
        seen["user_agent"] = (await sb.exec(["id", "-u"], user="agent")).stdout.strip()
        errors: dict[str, BaseException | None] = {}

        async def attempt(name: str, fn: Any) -> None:
            try:
                await fn()
                errors[name] = None
            except BaseException as exc:  # recorded, asserted by the test
                errors[name] = exc

        await attempt("missing", lambda: sb.read_file("no-such-file"))
        await attempt("dir", lambda: sb.read_file("sub"))
        await attempt("write_dir", lambda: sb.write_file("sub", "x"))
        await attempt("denied_write", lambda: sb.write_file(DENIED_PATH, "x"))
        await attempt("denied_exec", lambda: sb.exec([DENIED_TOOL, "--version"]))
        await attempt("root", lambda: sb.exec(["id", "-u"], user="root"))
        await attempt("timeout", lambda: sb.exec(["sleep", "30"], timeout=1))
        with override_max_read_file_size(3):
            await attempt("big_read", lambda: sb.read_file("sub/crlf.txt"))
            await attempt("small_read", lambda: sb.read_file("given.txt"))
        seen["errors"] = errors
        return state

    return solve


def test_contract_errors_map_onto_inspects_exceptions(
    backend: str, audit_log: Path, inspect_home: Path
) -> None:
    seen: dict[str, Any] = {}
    task = Task(
        dataset=[Sample(input="probe", files={"given.txt": "ok"})],
        solver=[contract_probe(seen)],
        sandbox=("glassroom", GlassroomSandboxConfig(backend=backend, audit_log=str(audit_log))),
    )
    _run(task, [], inspect_home / "logs")
    # The harmless halves.
    assert seen["stdin"] == (True, "piped")
    assert seen["cwd_env"] == ["/workspace/sub", "1"]
    assert seen["crlf"] == "a\r\nb" and seen["bytes"] == b"a\r\nb"
    assert seen["user_agent"] == "1000"
    err = seen["errors"]
    assert err["small_read"] is None
    # The refusals, each as the exception inspect's contract names.
    assert isinstance(err["missing"], FileNotFoundError), err["missing"]
    assert err["missing"].filename == "/workspace/no-such-file"
    assert isinstance(err["dir"], IsADirectoryError), err["dir"]
    assert isinstance(err["write_dir"], IsADirectoryError), err["write_dir"]
    assert isinstance(err["denied_write"], PermissionError), err["denied_write"]
    assert err["denied_write"].errno in (errno.EROFS, errno.EACCES)
    assert isinstance(err["denied_exec"], PermissionError), err["denied_exec"]
    assert "tools.allow" in str(err["denied_exec"])
    assert isinstance(err["root"], SandboxUserUnsupportedError), err["root"]
    assert isinstance(err["timeout"], TimeoutError), err["timeout"]
    assert isinstance(err["big_read"], OutputLimitExceededError), err["big_read"]
    assert not Path(DENIED_PATH).exists()
    # And glassroom's own record of the refusals, in that sandbox's log.
    sid = seen["sandbox"]
    hits = assert_blocked(audit_log, sid, "filesystem.write")
    assert [h["details"]["target"] for h in hits if h["event"] == "blocked"] == [DENIED_PATH]
    exe = assert_blocked(audit_log, sid, "tools.allow")
    assert any(os.path.basename(h["details"].get("target", "")) == DENIED_TOOL for h in exe)
    assert assert_blocked(audit_log, sid, "run.timeout_s")


def test_policy_file_config_and_a_remote_serve(
    tmp_path: Path, inspect_home: Path, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sandbox=("glassroom", "policy.toml")`` is a policy path (a bare
    ``"glassroom"`` finds ``glassroom.toml`` in the task's directory); with ``url``
    the same eval runs its sample in a ``glassroom serve`` sandbox under that policy."""
    monkeypatch.chdir(tmp_path)  # the task's run directory: inspect resolves from here
    policy = tmp_path / "glassroom.toml"
    policy.write_text('[tools]\nallow = ["sh", "cat", "id"]\n'
                      "[resources]\nmax_output_bytes = 1024\n")  # fmt: skip
    seen: dict[str, Any] = {}

    @solver
    def probe() -> Solver:
        async def solve(state: TaskState, generate: Generate) -> TaskState:
            env = sandbox().as_type(GlassroomSandboxEnvironment)
            seen["sandbox"] = env.sandbox.id
            seen["remote"] = type(env.sandbox).__name__
            seen["cat"] = (await sandbox().exec(["cat", "given.txt"])).stdout
            try:
                await sandbox().exec(["ls"])  # in the default policy, not in this one
                seen["ls"] = None
            except PermissionError as exc:
                seen["ls"] = exc
            for name, fn in [("write", lambda: sandbox().write_file(DENIED_PATH, "x")),
                             ("missing", lambda: sandbox().read_file("no-such-file")),
                             ("flood", lambda: sandbox().exec(["cat", "big.txt"]))]:  # fmt: skip
                try:
                    await fn()
                    seen[name] = None
                except (OSError, OutputLimitExceededError) as exc:
                    seen[name] = exc
            return state

        return solve

    remote = GlassroomSandboxConfig(policy=str(policy), url=serve.url,
                                    api_key=serve.keys["alice"], backend="namespaces")  # fmt: skip
    spec: Any
    for where, spec in [
        ("discovered", "glassroom"),
        ("local", ("glassroom", "glassroom.toml")),
        ("remote", ("glassroom", remote)),
    ]:
        seen.clear()
        files = {"given.txt": where, "big.txt": "x" * 4096}
        task = Task(dataset=[Sample(input="p", files=files)], solver=[probe()], sandbox=spec)
        _run(task, [], inspect_home / "logs")
        assert seen["cat"] == where
        assert seen["remote"] == ("RemoteSandbox" if where == "remote" else "Sandbox")
        # the policy file's rules hold: ls refused, the output cap at 1024 bytes
        assert isinstance(seen["ls"], PermissionError), (where, seen["ls"])
        assert isinstance(seen["write"], PermissionError), (where, seen["write"])
        assert isinstance(seen["missing"], FileNotFoundError), (where, seen["missing"])
        # the policy's output cap cut the cat short: an error, not a silently short result
        assert isinstance(seen["flood"], OutputLimitExceededError), (where, seen["flood"])
        assert "max_output_bytes" in str(seen["flood"])
    assert_blocked(serve.cfg.audit_log, seen["sandbox"], "tools.allow")
    assert_blocked(serve.cfg.audit_log, seen["sandbox"], "filesystem.write")
    assert not Path(DENIED_PATH).exists()
