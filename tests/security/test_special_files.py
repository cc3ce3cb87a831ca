"""FIFOs, sockets and devices the sandbox makes never stall the host's file API.

Attack review: code in the sandbox runs ``os.mkfifo('/workspace/p')``.  The
listing called it a ``file``, and a host-side ``read_file`` (a files-only
snapshot reads every ``file``; so does E2B's files API) made the in-sandbox
side do a blocking ``open``, which waits for a writer forever; the host
waited with no bound, and the microVM agent (file ops in its main loop)
stopped serving the whole sandbox.

Each pair: the harmless twin works (a regular file reads back, a new file
is created), the attack fails fast with the path named (ENXIO: not a
regular file, the same on every tier), and the sandbox still works after.
Listings call such entries ``other``; files-only snapshots skip and count
them (``skipped_special``).  The host's own bound (``FILE_OP_TIMEOUT_S``)
is checked apart, with an init that cannot answer (a frozen sandbox).
"""

from __future__ import annotations

import errno
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import records
from glassroom import Sandbox, SandboxError, SnapshotStore
from glassroom.backends import _files

#: "Fails fast": far below any timeout, with room for a slow (TCG) microVM.
FAST_S = 10.0
MKFIFO = "import os; os.mkfifo('/workspace/p')"
#: A bound Unix socket stays in the directory after its process ends.
MKSOCK = "import socket; socket.socket(socket.AF_UNIX).bind('/workspace/s')"


def _py(sb: Sandbox, code: str) -> None:
    r = sb.run(["python3", "-c", code])
    assert r.exit_code == 0, r.stderr


def _still_works(sb: Sandbox) -> None:
    assert sb.run(["echo", "alive"]).stdout == "alive\n"
    sb.files.write("/workspace/after.txt", b"after")
    assert sb.files.read("/workspace/after.txt") == b"after"


def _fails_fast(op: Callable[[], Any], path: str) -> SandboxError:
    t0 = time.monotonic()
    with pytest.raises(SandboxError) as info:
        op()
    took = time.monotonic() - t0
    assert took < FAST_S, f"took {took:.1f}s"
    assert path in str(info.value)
    assert getattr(info.value, "errno", None) == errno.ENXIO, info.value
    return info.value


# -- read -------------------------------------------------------------------------------


def test_regular_file_made_inside_reads_back(make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox()
    _py(sb, "open('/workspace/r', 'w').write('regular')")
    assert sb.files.read("/workspace/r") == b"regular"


def test_fifo_read_fails_fast(make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox()
    _py(sb, MKFIFO)
    _fails_fast(lambda: sb.files.read("/workspace/p"), "/workspace/p")
    _still_works(sb)
    # Again, after the sandbox went on: nothing was left half-done the first time.
    _fails_fast(lambda: sb.files.read("/workspace/p"), "/workspace/p")


def test_symlink_to_fifo_read_fails_fast(make_sandbox: Callable[..., Sandbox]) -> None:
    """What a symlink leads to is checked, not only the name asked for."""
    sb = make_sandbox()
    _py(sb, MKFIFO + "; os.symlink('p', '/workspace/via')")
    _fails_fast(lambda: sb.files.read("/workspace/via"), "/workspace/via")
    _still_works(sb)


def test_socket_read_fails_fast(make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox()
    _py(sb, MKSOCK)
    _fails_fast(lambda: sb.files.read("/workspace/s"), "/workspace/s")
    _still_works(sb)


def test_device_read_is_refused(make_sandbox: Callable[..., Sandbox]) -> None:
    """/dev/zero would otherwise read back max_bytes of zeros: not a file."""
    sb = make_sandbox()
    _fails_fast(lambda: sb.files.read("/dev/zero"), "/dev/zero")
    _still_works(sb)


# -- write ------------------------------------------------------------------------------


def test_new_and_existing_regular_files_are_written(make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox()
    sb.files.write("/workspace/new.txt", b"created")
    assert sb.run(["cat", "/workspace/new.txt"]).stdout == "created"
    sb.files.write("/workspace/new.txt", b"again")
    assert sb.files.read("/workspace/new.txt") == b"again"


def test_fifo_write_fails_fast(make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox()
    _py(sb, MKFIFO)
    _fails_fast(lambda: sb.files.write("/workspace/p", b"x" * 100_000), "/workspace/p")
    _still_works(sb)


def test_fifo_with_a_reader_is_not_written(make_sandbox: Callable[..., Sandbox]) -> None:
    """A reader waiting on the FIFO lets the open succeed: the type check still refuses."""
    sb = make_sandbox()
    _py(sb, MKFIFO)
    reader = sb.spawn(["python3", "-c", "import sys; sys.stdout.buffer.write("
                       "open('/workspace/p', 'rb').read())"])  # fmt: skip
    time.sleep(0.5)  # the reader is blocked in its open of the FIFO
    _fails_fast(lambda: sb.files.write("/workspace/p", b"from the host"), "/workspace/p")
    res = reader.wait(timeout=FAST_S)
    assert res is not None and b"from the host" not in res.stdout
    _still_works(sb)


def test_socket_write_fails_fast(make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox()
    _py(sb, MKSOCK)
    _fails_fast(lambda: sb.files.write("/workspace/s", b"x"), "/workspace/s")
    _still_works(sb)


# -- listing and snapshots ----------------------------------------------------------------


def test_listing_calls_special_files_other(make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox()
    _py(sb, MKFIFO + "; open('/workspace/f', 'w').write('x'); os.mkdir('/workspace/d');"
                     " os.symlink('f', '/workspace/l')")  # fmt: skip
    _py(sb, MKSOCK)
    types = {e.name: e.type for e in sb.files.list("/workspace")}
    assert {k: types.get(k) for k in ("p", "s", "f", "d", "l")} == {
        "p": "other", "s": "other", "f": "file", "d": "dir", "l": "symlink",
    }  # fmt: skip


def test_snapshot_skips_special_files(
    make_sandbox: Callable[..., Sandbox], backend: str, audit_log: Path, tmp_path: Path
) -> None:
    store = SnapshotStore(tmp_path / "s")
    sb = make_sandbox(store=store)
    sb.files.write("/workspace/keep.txt", b"kept")
    _py(sb, MKFIFO)
    t0 = time.monotonic()
    info = sb.snapshot() if backend == "namespaces" else sb.snapshot(memory=False)
    assert time.monotonic() - t0 < 60
    assert info.memory is False
    made = [r for r in records(audit_log, sb.id) if r["event"] == "snapshot.created"]
    files = made[-1]["details"]["files"]
    assert files["skipped_special"] == 1 and files["files"] >= 1, files
    _still_works(sb)
    with Sandbox.from_snapshot(info.id, store=store, audit_log=audit_log) as back:
        assert back.files.read("/workspace/keep.txt") == b"kept"
        assert "p" not in {e.name for e in back.files.list("/workspace")}


# -- the host's own bound -----------------------------------------------------------------


class _Silent(_files.FileOps):
    """A backend whose sandbox never answers."""

    def __init__(self) -> None:
        self.anomalies: list[str] = []
        self.q: queue.Queue[dict[str, Any]] = queue.Queue()

    def _anomaly(self, what: str) -> None:
        self.anomalies.append(what)

    def _file_op(self, kind: str, path: str, **_kw: Any) -> bytes:
        self._file_reply(self.q, kind, path)
        return b""


def test_host_wait_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_files, "FILE_OP_TIMEOUT_S", 0.2)
    ops = _Silent()
    t0 = time.monotonic()
    with pytest.raises(SandboxError, match=r"/workspace/p.*did not answer"):
        ops.read_file("/workspace/p", 10)
    assert time.monotonic() - t0 < 5
    assert len(ops.anomalies) == 1 and "/workspace/p" in ops.anomalies[0]
    # A reply that arrives in time is taken as it is.
    ops.q.put({"op": "done"})
    assert ops.read_file("/workspace/x", 10) == b""


def test_host_wait_goes_on_while_bytes_move(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long transfer is not a stall: only a wait with no progress is."""
    monkeypatch.setattr(_files, "FILE_OP_TIMEOUT_S", 0.2)
    ops = _Silent()
    moved = [0]

    def later() -> None:
        for _ in range(5):
            time.sleep(0.1)
            moved[0] += 1
        ops.q.put({"op": "exit"})

    threading.Thread(target=later, daemon=True).start()
    assert ops._file_reply(ops.q, "read", "/workspace/big", progress=lambda: moved[0]) == {
        "op": "exit"
    }
    assert ops.anomalies == []


@pytest.mark.parametrize("backend", ["namespaces"])
def test_unanswering_init_is_an_anomaly_not_a_hang(
    make_sandbox: Callable[..., Sandbox], audit_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frozen sandbox cannot answer: the read gives up, logged; thawed, it goes on."""
    monkeypatch.setattr(_files, "FILE_OP_TIMEOUT_S", 1.0)
    sb = make_sandbox()
    sb.files.write("/workspace/r", b"regular")
    inst = sb._sup.instance
    try:
        inst.freeze()
    except Exception as exc:  # no cgroups here
        pytest.skip(f"cannot freeze: {exc}")
    try:
        t0 = time.monotonic()
        with pytest.raises(SandboxError, match="did not answer"):
            sb.files.read("/workspace/r")
        assert time.monotonic() - t0 < FAST_S
    finally:
        inst.thaw()
    monkeypatch.setattr(_files, "FILE_OP_TIMEOUT_S", 60.0)
    _still_works(sb)
    anomalies = [r for r in records(audit_log, sb.id) if r["event"] == "anomaly"]
    assert any("/workspace/r" in str(r["details"].get("detail")) for r in anomalies), anomalies
