"""Faults of ``glassroom serve`` itself, mid-stream: SIGTERM and SIGKILL.

A real ``glassroom serve`` subprocess (its own state dir and cgroup parent,
so every leftover is attributable) runs long streaming commands, through the
own API's NDJSON stream and (namespaces) the unmodified e2b SDK's Connect
stream, when it is signalled:

* SIGTERM: the process is gone within the documented bound
  (``shutdown_timeout_s``, default 10 s), every stream ended with its end
  message, every sandbox has ``sandbox.destroyed``, and nothing is left:
  no process, mount, cgroup or state record; the audit log verifies.
* SIGKILL: nothing could clean up, so the restarted server must: the reaper
  runs when ``serve`` starts (before it answers), after which nothing is left
  and the log, with its ``reaper.cleaned`` records, verifies.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from glassroom._sys import cgroups
from glassroom.audit import read_records, verify

from .serve_helpers import free_port, wait_listening

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="these fault tests run glassroom serve as root"),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
]

#: The documented default bound on stopping (docs/service.md, "Stopping").
BOUND_S = 10.0
TICKS = "i=0; while true; i=$((i+1)); do echo tick $i; sleep 0.2; done"
CONTROLLERS = ("memory", "pids", "cpu", "freezer")


@dataclass
class Serve:
    """One ``glassroom serve`` subprocess and everything it may leave behind."""

    root: Path
    parent: str
    key: str = field(default_factory=lambda: "e2b_" + secrets.token_hex(20))
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    stderr: list[str] = field(default_factory=list)

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.data / "audit.jsonl"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        keep = ("PATH", "HOME", "PYTHONPATH", "GLASSROOM_MICROVM_CACHE")
        env = {k: os.environ[k] for k in keep if k in os.environ}
        env.update(
            GLASSROOM_STATE_DIR=str(self.state),
            GLASSROOM_CGROUP_PARENT=self.parent,
            GLASSROOM_AUDIT_LOG=str(self.root / "fallback-audit.jsonl"),
            GLASSROOM_MICROVM_ALLOW_TCG="1",
            GLASSROOM_API_KEY=self.key,
            GLASSROOM_TENANT="faults",
        )
        return env

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "glassroom.interfaces.cli", "serve",
             "--port", str(self.port), "--data-dir", str(self.data)],
            env=self.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd="/",
        )  # fmt: skip
        proc = self.proc
        assert proc.stderr is not None
        err = proc.stderr

        def drain() -> None:
            for line in iter(err.readline, b""):
                self.stderr.append(line.decode(errors="replace"))

        threading.Thread(target=drain, daemon=True).start()
        end = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "serve exited at start:\n" + "".join(self.stderr[-40:])
            assert time.monotonic() < end, "serve did not start:\n" + "".join(self.stderr[-40:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/v1/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)

    def verify(self) -> Any:
        """The audit chain, and its anchor against the key of *this* server's state dir."""
        pub = self.state / "audit-anchor.pub"
        assert pub.exists(), "the server anchored nothing at its stop"
        return verify(self.log, pubkey=pub)

    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.key}

    def signal_and_wait(self, sig: int, timeout: float) -> float:
        """Send ``sig``; return how long the process took to exit (fails past ``timeout``)."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            pytest.fail(f"serve did not exit within {timeout} s of signal {sig}")
        return time.monotonic() - t0

    # -- what is left --------------------------------------------------------

    def records(self) -> list[str]:
        d = self.state / "sandboxes"
        return sorted(os.listdir(d)) if d.is_dir() else []

    def cgroups(self) -> list[str]:
        return cgroups.list_names(self.parent)

    def processes(self, ids: list[str]) -> list[str]:
        """Every host process in our cgroup parent or naming our state dir or a sandbox
        (but a running server itself)."""
        needles = [str(self.root).encode(), *(i.encode() for i in ids)]
        me = str(self.proc.pid) if self.proc is not None and self.proc.poll() is None else ""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if pid == me:
                continue
            try:
                with open(f"/proc/{pid}/cgroup", "rb") as f:
                    in_parent = f"/{self.parent}/".encode() in f.read()
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if in_parent or any(n in cmd for n in needles):
                shown = cmd.replace(b"\0", b" ")[:200].decode(errors="replace")
                found.append(f"{pid}: {shown}")
        return found

    def mounts(self, ids: list[str]) -> list[str]:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            return [ln for ln in f if str(self.root) in ln or any(i in ln for i in ids)]

    def leftovers(self, ids: list[str]) -> dict[str, list[str]]:
        return {
            "processes": self.processes(ids),
            "cgroups": self.cgroups(),
            "mounts": self.mounts(ids),
            "records": self.records(),
        }

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for name in cgroups.list_names(self.parent):
            with contextlib.suppress(Exception):
                cs = cgroups.CgroupSet.open(name, parent=self.parent)
                cs.kill_all(timeout=5.0)
                cs.remove()
        lay = cgroups.layout()
        for c in CONTROLLERS:
            if c in lay:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(lay[c][1], self.parent))
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def serve_proc() -> Iterator[Serve]:
    # Not pytest's tmp_path: that is 0700, and the sandbox (uid 65534) must
    # traverse the state dir to read its init.
    root = Path(tempfile.mkdtemp(prefix="gr-faults-"))
    os.chmod(root, 0o755)
    s = Serve(root=root, parent=f"gr-test-faults-{secrets.token_hex(4)}")
    try:
        yield s
    finally:
        s.cleanup()


def _wait_for(pred: Callable[[], Any], timeout: float) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > end:
            return value
        time.sleep(0.1)


class Stream(threading.Thread):
    """An own-API NDJSON stream of TICKS, read in a thread until it ends."""

    def __init__(self, s: Serve, backend: str) -> None:
        super().__init__(daemon=True)
        self.s = s
        r = httpx.post(
            s.url + "/v1/sandboxes",
            json={"backend": backend, "timeout_s": 600},
            headers=s.headers(),
            timeout=300,
        )
        assert r.status_code == 201, r.text
        assert r.json()["backend"] == backend, r.json()  # never a silent fallback
        self.sid: str = r.json()["sandbox_id"]
        self.lines: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.ended_at: float | None = None

    def run(self) -> None:
        try:
            with httpx.stream(
                "POST",
                f"{self.s.url}/v1/sandboxes/{self.sid}/commands/stream",
                json={"command": TICKS},
                headers=self.s.headers(),
                timeout=httpx.Timeout(30, read=60),
            ) as r:
                for line in r.iter_lines():
                    if line.strip():
                        self.lines.append(json.loads(line))
        except BaseException as exc:  # a broken stream is a finding, recorded
            self.error = exc
        self.ended_at = time.monotonic()

    def ticks(self) -> int:
        return sum(1 for x in self.lines if x.get("type") == "stdout")


class E2bStream(threading.Thread):
    """The e2b SDK's Connect process stream of TICKS (``commands.run`` + ``wait``)."""

    def __init__(self, s: Serve, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(daemon=True)
        e2b = pytest.importorskip("e2b")
        monkeypatch.setenv("E2B_API_URL", s.url)
        monkeypatch.setenv("E2B_SANDBOX_URL", s.url)
        monkeypatch.setenv("E2B_API_KEY", s.key)
        self.sb = e2b.Sandbox.create(timeout=600)
        self.sid: str = self.sb.sandbox_id
        self.out: list[str] = []
        self.handle = self.sb.commands.run(TICKS, background=True)
        self.error: BaseException | None = None
        self.ended_at: float | None = None

    def run(self) -> None:
        try:
            self.handle.wait(on_stdout=self.out.append)
        except BaseException as exc:  # CommandExitException: the end event came
            self.error = exc
        self.ended_at = time.monotonic()


def _streams(s: Serve, backend: str, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    made: list[Any] = [Stream(s, backend), Stream(s, backend)]
    if backend == "namespaces":
        made.append(E2bStream(s, monkeypatch))
    for t in made:
        t.start()
    # mid-stream: every stream has delivered output
    assert _wait_for(
        lambda: all((t.ticks() if isinstance(t, Stream) else len(t.out)) >= 3 for t in made), 60
    ), "the streams did not start"
    return made


def _backend_ready(backend: str) -> None:
    from glassroom.interfaces.doctor import report

    status = str(report().get("backends", {}).get(backend, "unknown"))
    if not status.startswith("ready"):
        pytest.skip(f"backend {backend}: {status}")


BACKENDS = ["namespaces", "gvisor", "microvm"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_mid_stream_stops_within_bound_and_leaves_nothing(
    backend: str, serve_proc: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    _backend_ready(backend)
    s = serve_proc
    s.start()
    streams = _streams(s, backend, monkeypatch)
    ids = [t.sid for t in streams]
    signalled = time.monotonic()
    took = s.signal_and_wait(signal.SIGTERM, BOUND_S + 5)
    print(f"\n{backend}: SIGTERM -> exit in {took:.2f} s with {len(streams)} streams")
    assert took < BOUND_S, f"serve took {took:.2f} s to stop (bound {BOUND_S} s)"
    assert s.proc is not None and s.proc.returncode in (0, -signal.SIGTERM), s.proc.returncode

    # every stream ended, with its end message, not by a cut connection
    for t in streams:
        t.join(10)
        assert not t.is_alive(), f"stream of {t.sid} still open after the server stopped"
        assert t.ended_at is not None and t.ended_at - signalled < BOUND_S
        if isinstance(t, Stream):
            assert t.error is None, repr(t.error)
            assert t.lines[-1]["type"] == "exit", t.lines[-3:]
            assert t.lines[-1]["signal"] == signal.SIGKILL, t.lines[-1]
        else:
            assert type(t.error).__name__ == "CommandExitException", repr(t.error)

    # nothing is left, and the log says each sandbox was destroyed cleanly
    left = _wait_for(lambda: not any(s.leftovers(ids).values()), 5) or s.leftovers(ids)
    assert left is True, left
    res = s.verify()
    assert res.ok, res.problems
    recs = list(read_records(s.log))
    for sid in ids:
        gone = [r for r in recs if r.get("sandbox") == sid and r["event"] == "sandbox.destroyed"]
        assert len(gone) == 1, [r["event"] for r in recs if r.get("sandbox") == sid]
        assert not any(gone[0]["details"]["leftovers"].values()), gone[0]
    assert not [ln for ln in s.stderr if "Traceback" in ln], "".join(s.stderr[-60:])
    assert not [ln for ln in s.stderr if "longer than" in ln], "the watchdog had to end it"


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_mid_stream_then_restart_reaps_everything(
    backend: str, serve_proc: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    _backend_ready(backend)
    s = serve_proc
    s.start()
    streams = _streams(s, backend, monkeypatch)
    ids = [t.sid for t in streams]
    s.signal_and_wait(signal.SIGKILL, 10)
    for t in streams:
        t.join(30)
        assert not t.is_alive(), f"stream of {t.sid} outlived a killed server"
    # nothing ran the teardown: the records and cgroups are there for the reaper
    assert len(s.records()) >= len(ids), s.records()

    s.stderr.clear()
    t0 = time.monotonic()
    s.start()  # returns once /v1/health answers: the reaper has already run
    print(f"\n{backend}: restart after SIGKILL answered in {time.monotonic() - t0:.2f} s")
    left = _wait_for(lambda: not any(s.leftovers(ids).values()), 5) or s.leftovers(ids)
    assert left is True, left
    recs = list(read_records(s.log))
    for sid in ids:
        cleaned = [r for r in recs if r.get("sandbox") == sid and r["event"] == "reaper.cleaned"]
        assert len(cleaned) == 1, [r["event"] for r in recs if r.get("sandbox") == sid]
        assert cleaned[0]["rule"] == "lifecycle.reaper" and not cleaned[0]["details"].get("errors")

    # and the restarted server serves, then stops cleanly itself
    r = httpx.post(s.url + "/v1/sandboxes", json={"backend": backend}, headers=s.headers(), timeout=300)
    assert r.status_code == 201, r.text
    new = r.json()["sandbox_id"]
    took = s.signal_and_wait(signal.SIGTERM, BOUND_S + 5)
    assert took < BOUND_S, took
    left = _wait_for(lambda: not any(s.leftovers([*ids, new]).values()), 5)
    assert left is True, s.leftovers([*ids, new])
    res = s.verify()
    assert res.ok, res.problems
    assert not [ln for ln in s.stderr if "Traceback" in ln], "".join(s.stderr[-60:])


# -- the watchdog itself ---------------------------------------------------------

_STUCK_SERVER = r"""
import logging, sys, time
import uvicorn
from glassroom.interfaces.http._serve import BoundedServer

class Stuck:  # a service whose teardown hangs, as one stuck in the kernel would
    def begin_shutdown(self):
        if sys.argv[2] == "flood":  # more log than a pipe holds, and nobody reads it
            for _ in range(2000):
                logging.getLogger("uvicorn.error").info("x" * 100)
    def close(self):
        time.sleep(3600)

async def app(scope, receive, send):
    assert scope["type"] == "lifespan"
    while True:
        m = await receive()
        if m["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        else:
            Stuck().close()  # and it blocks the event loop, too

cfg = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), lifespan="on",
                     timeout_graceful_shutdown=1)
try:
    BoundedServer(cfg, Stuck(), 2.0).run()
finally:
    Stuck().close()
"""


@pytest.mark.parametrize("how", ["stuck", "flood"])
def test_watchdog_ends_the_process_at_the_bound(how: str, tmp_path: Path) -> None:
    """A teardown that hangs (and blocks the event loop), or a log line that blocks
    on a full stderr pipe: the process still ends at the bound, status 70.  With
    the flood it used to hang for good: the watchdog's own log line blocked, and
    the watchdog was only started by shutdown(), behind the blocked loop."""
    port = free_port()
    env = {k: os.environ[k] for k in ("PATH", "HOME", "PYTHONPATH") if k in os.environ}
    proc = subprocess.Popen(
        [sys.executable, "-c", _STUCK_SERVER, str(port), how],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,  # never read while it runs: a full pipe, for "flood"
        cwd=tmp_path,
    )
    try:
        wait_listening(proc, port, 30)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(15)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()
    assert code == 70, code
    assert 1.5 < took < 5.0, took
