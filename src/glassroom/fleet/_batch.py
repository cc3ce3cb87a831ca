"""``glassroom.fleet.run_batch``: many tasks, each in a fresh sandbox of the fleet.

An RL rollout or an eval is a batch: N tasks, each a few commands in its own
sandbox, results back in order.  The fleet's front door does the placing; this
bounds how many sandboxes the batch holds at once (``concurrency``, which
should stay within the tenant's ``max_sandboxes``) and says how far it got
(a callback, or iterate :func:`iter_batch`).  A task that fails is a result
with ``error`` set, not an exception that loses the others' results.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Task:
    """One unit of a batch: commands run in order in one fresh sandbox."""

    commands: Sequence[Sequence[str] | str]
    template: str | None = None
    policy: Mapping[str, Any] | str | None = None
    files: Mapping[str, bytes | str] = field(default_factory=dict)
    timeout_s: float | None = None
    #: stop at the first command that exits non-zero
    stop_on_error: bool = True


@dataclass(frozen=True)
class CommandOutcome:
    exit_code: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class TaskResult:
    index: int
    sandbox_id: str | None
    outcomes: list[CommandOutcome]
    error: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None and all(o.exit_code == 0 for o in self.outcomes)


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    failed: int
    last: TaskResult


def _run_one(url: str, api_key: str, index: int, task: Task) -> TaskResult:
    import httpx

    began = time.monotonic()
    sid: str | None = None
    outcomes: list[CommandOutcome] = []
    headers = {"X-API-Key": api_key}
    with httpx.Client(base_url=url, headers=headers, timeout=600, trust_env=False) as http:
        try:
            body: dict[str, Any] = {"template": task.template, "policy": task.policy,
                                    "timeout_s": task.timeout_s}  # fmt: skip
            r = http.post("/v1/sandboxes", json={k: v for k, v in body.items() if v is not None})
            if r.status_code != 201:
                return TaskResult(index, None, [], _message(r), time.monotonic() - began)
            sid = str(r.json()["sandbox_id"])
            for path, data in task.files.items():
                w = http.put(f"/v1/sandboxes/{sid}/files", params={"path": path},
                             content=data.encode() if isinstance(data, str) else data)  # fmt: skip
                if w.status_code >= 300:
                    return TaskResult(index, sid, outcomes, _message(w), time.monotonic() - began)
            for cmd in task.commands:
                req = {"command": cmd} if isinstance(cmd, str) else {"argv": list(cmd)}
                c = http.post(f"/v1/sandboxes/{sid}/commands", json=req)
                if c.status_code != 200:
                    return TaskResult(index, sid, outcomes, _message(c), time.monotonic() - began)
                d = c.json()
                outcomes.append(CommandOutcome(int(d["exit_code"]), d["stdout"], d["stderr"]))
                if task.stop_on_error and outcomes[-1].exit_code != 0:
                    break
            return TaskResult(index, sid, outcomes, None, time.monotonic() - began)
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            return TaskResult(index, sid, outcomes, f"{type(exc).__name__}: {exc}",
                              time.monotonic() - began)  # fmt: skip
        finally:
            if sid is not None:
                try:
                    http.delete(f"/v1/sandboxes/{sid}")
                except httpx.HTTPError:
                    pass


def _message(r: Any) -> str:
    try:
        err = r.json().get("error", {})
        rule = f" (rule {err['rule']})" if err.get("rule") else ""
        return f"{r.status_code} {err.get('message', '')}{rule}"
    except Exception:
        return f"{r.status_code} {r.text[:200]}"


def iter_batch(
    tasks: Sequence[Task], *, url: str, api_key: str, concurrency: int = 8
) -> Iterator[TaskResult]:
    """Run ``tasks`` with at most ``concurrency`` sandboxes at once; yield each
    result as it finishes (not in order: ``TaskResult.index`` says which)."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    done: queue.Queue[TaskResult] = queue.Queue()
    pool = ThreadPoolExecutor(min(concurrency, max(1, len(tasks))), "glassroom-batch")
    stop = threading.Event()

    def one(i: int, t: Task) -> None:
        if stop.is_set():
            return
        done.put(_run_one(url, api_key, i, t))

    try:
        for i, t in enumerate(tasks):
            pool.submit(one, i, t)
        for _ in tasks:
            yield done.get()
    finally:
        stop.set()  # an abandoned iterator starts nothing new
        pool.shutdown(wait=True)


def run_batch(
    tasks: Sequence[Task],
    *,
    url: str,
    api_key: str,
    concurrency: int = 8,
    progress: Callable[[Progress], None] | None = None,
) -> list[TaskResult]:
    """Run ``tasks`` across the fleet behind ``url``; the results in task order."""
    out: list[TaskResult | None] = [None] * len(tasks)
    failed = 0
    for n, res in enumerate(iter_batch(tasks, url=url, api_key=api_key,
                                       concurrency=concurrency), start=1):  # fmt: skip
        out[res.index] = res
        failed += 0 if res.ok else 1
        if progress is not None:
            progress(Progress(n, len(tasks), failed, res))
    return [r for r in out if r is not None]
