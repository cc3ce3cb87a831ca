"""Tests for the hash-chained audit log: writing, tampering detection, querying."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from glassroom._errors import AuditError, AuditIntegrityError
from glassroom.audit import (
    GENESIS_HASH,
    MAX_RECORD_BYTES,
    AuditLog,
    VerifyResult,
    format_table,
    read_records,
    select,
    verify,
    verify_or_raise,
)

TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


#: Every test gets its own state dir (tests/unit/conftest.py).
pytestmark = pytest.mark.usefixtures("state")


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode()


def make_log(path: Path, n: int = 10) -> Path:
    """A log WITHOUT an anchor: these tests are about the chain alone."""
    with AuditLog(path, fsync=False, anchor=False) as log:
        for i in range(1, n + 1):
            log.append(f"sb{i % 3}", "command.started", {"argv": ["echo", str(i)]})
    return path


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def tampered(src: Path, tmp_path: Path, new_lines: list[bytes]) -> Path:
    """Write a tampered COPY so the original stays intact."""
    copy = tmp_path / "copy.jsonl"
    shutil.copyfile(src, copy)
    copy.write_bytes(b"".join(new_lines))
    return copy


# --------------------------------------------------------------------------- writer


def test_append_writes_canonical_chained_records(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        r1 = log.append("-", "sandbox.created", {"id": "abc"})
        r2 = log.append("abc", "blocked", {"path": "/etc"}, decision="deny", rule="fs.deny")
    assert log.path == path
    raw = lines_of(path)
    assert len(raw) == 2
    for line, rec in zip(raw, (r1, r2), strict=True):
        assert line == canonical(rec) + b"\n"
        body = {k: v for k, v in rec.items() if k != "hash"}
        assert rec["hash"] == hashlib.sha256(canonical(body)).hexdigest()
        assert TS_RE.match(rec["ts"])
        assert set(rec) == {
            "seq", "ts", "sandbox", "event", "details", "decision", "rule", "prev", "hash",
        }  # fmt: skip
    assert (r1["seq"], r1["prev"], r1["decision"], r1["rule"]) == (1, GENESIS_HASH, "info", None)
    assert (r2["seq"], r2["prev"], r2["decision"], r2["rule"]) == (2, r1["hash"], "deny", "fs.deny")
    result = verify(path)
    assert result == VerifyResult(True, 2, [], 2, r2["hash"], 2, result.anchor_status)
    assert result.anchor_status and result.anchor_status.endswith(", ok")


def test_creates_private_dirs_and_file(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "audit.jsonl"
    old = os.umask(0o022)
    try:
        AuditLog(path).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "b").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_reopen_continues_chain(tmp_path: Path) -> None:
    path = make_log(tmp_path / "audit.jsonl", 3)
    with AuditLog(path) as log:
        rec = log.append("-", "anomaly")
    assert rec["seq"] == 4
    assert verify(path).ok


def test_rejects_bad_values_without_writing(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        with pytest.raises(AuditError, match="decision"):
            log.append("-", "x", decision="maybe")
        with pytest.raises(AuditError, match=r"not JSON-serializable.*set"):
            log.append("-", "x", {"s": {1, 2}})
        with pytest.raises(AuditError, match="not JSON-serializable"):
            log.append("-", "x", {"f": float("nan")})
        with pytest.raises(AuditError, match="event"):
            log.append("-", "")
    assert path.read_bytes() == b""


def test_details_are_normalized_so_hash_survives_reread(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        rec = log.append("-", "x", {"t": (1, 2), "n": {10: "a", 9: "b"}})
    assert rec["details"] == {"t": [1, 2], "n": {"10": "a", "9": "b"}}
    assert verify(path).ok


def test_close_is_idempotent_and_blocks_append(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.close()
    log.close()
    with pytest.raises(AuditError, match="closed"):
        log.append("-", "x")


def test_oversized_details_are_truncated_to_fit(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        rec = log.append("sb", "command.ended", {"stdout": "x" * 200_000, "err": "y" * 100_000,
                                                 "small": "keep", "exit_code": 0})  # fmt: skip
    line = lines_of(path)[0]
    assert len(line) <= MAX_RECORD_BYTES
    d = rec["details"]
    assert d["_truncated"] is True
    assert d["small"] == "keep" and d["exit_code"] == 0
    assert re.search(r"…\(truncated \d+ bytes\)$", d["stdout"])
    assert re.search(r"…\(truncated \d+ bytes\)$", d["err"])
    cut = int(re.search(r"truncated (\d+) bytes", d["stdout"]).group(1))  # type: ignore[union-attr]
    assert cut == 200_000 - d["stdout"].index("…")
    assert verify(path).ok


def test_oversized_details_without_long_strings_fall_back(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        rec = log.append("sb", "x", {f"k{i}": i for i in range(20_000)})
    assert len(lines_of(path)[0]) <= MAX_RECORD_BYTES
    assert rec["details"]["_truncated"] is True and "too large" in rec["details"]["_error"]
    assert verify(path).ok


def test_threads_share_one_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, fsync=False) as log:

        def work(n: int) -> None:
            for i in range(50):
                log.append(f"t{n}", "command.started", {"i": i})

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    result = verify(path)
    assert result.ok, result.problems
    assert result.records == 400 and result.last_seq == 400


def _worker(path: str, n: int) -> None:
    with AuditLog(path) as log:
        for i in range(50):
            log.append(f"proc{n}", "command.started", {"i": i})


def test_multiple_processes_append_safely(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(str(path), n)) for n in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    result = verify(path)
    assert result.ok, result.problems
    assert [r["seq"] for r in read_records(path)] == list(range(1, 201))


def _use_inherited(log: AuditLog) -> None:
    for i in range(50):
        log.append("child", "x", {"i": i})


def test_log_inherited_across_fork_still_serializes(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, fsync=False) as log:
        log.append("parent", "x")
        child = multiprocessing.get_context("fork").Process(target=_use_inherited, args=(log,))
        child.start()
        for i in range(50):
            log.append("parent", "x", {"i": i})
        child.join(30)
        assert child.exitcode == 0
        log.append("parent", "x")
    result = verify(path)
    assert result.ok, result.problems
    assert result.records == 102


def test_two_writers_in_one_process_interleave(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, fsync=False) as a, AuditLog(path, fsync=False) as b:
        for i in range(20):
            (a if i % 3 else b).append("-", "x", {"i": i})
    assert verify(path).ok and verify(path).last_seq == 20


def test_concurrent_writers_share_fsyncs_and_each_returns_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: writers of one file (eight logs here, as a server's
    sandboxes each have one) share fsyncs, and every append returns only after
    an fsync that began once its record was written."""
    path = tmp_path / "audit.jsonl"
    logs = [AuditLog(path) for _ in range(8)]
    real_write, real_fsync = os.write, os.fsync
    lock = threading.Lock()
    state = {"written": 0, "durable": 0, "fsyncs": 0}
    fds = {log._fd for log in logs}

    def write(f: int, data: Any) -> int:
        n = real_write(f, data)
        if f in fds:
            with lock:
                state["written"] += n
        return n

    def fsync(f: int) -> None:
        with lock:
            upto = state["written"]
        real_fsync(f)
        if f in fds:
            with lock:
                state["durable"] = max(state["durable"], upto)
                state["fsyncs"] += 1

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)
    late: list[int] = []
    start = threading.Barrier(len(logs))

    def writer(log: AuditLog, i: int) -> None:
        start.wait()
        for j in range(25):
            rec = log.append(f"sb-{i}", "x", {"j": j})
            data = path.read_bytes()
            end = data.index(b"\n", data.index(rec["hash"].encode())) + 1
            with lock:
                if state["durable"] < end:
                    late.append(rec["seq"])

    threads = [threading.Thread(target=writer, args=(log, i)) for i, log in enumerate(logs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in logs:
        log.close()
    result = verify(path)
    assert result.ok, result.problems
    assert result.last_seq == 200
    assert not late  # no append returned before its record was fsync'd
    assert state["fsyncs"] <= 200  # at most one per batch


def test_torn_tail_is_terminated_and_chain_resumes(tmp_path: Path) -> None:
    path = make_log(tmp_path / "audit.jsonl", 5)
    last = json.loads(lines_of(path)[-1])
    with open(path, "ab") as f:  # a crash mid-write: half a record, no newline
        f.write(b'{"decision":"info","details":{"argv":["ru')
    before = verify(path)
    assert not before.ok
    assert before.problems == [
        "line 6: torn/unparseable record (no trailing newline — incomplete write)"
    ]
    assert (before.records, before.last_seq) == (5, 5)

    with AuditLog(path) as log:
        rec = log.append("-", "anomaly", {"reason": "after crash"})
    assert rec["seq"] == 6 and rec["prev"] == last["hash"]
    raw = lines_of(path)
    assert len(raw) == 7 and raw[5].endswith(b'"ru\n')
    after = verify(path)
    assert len(after.problems) == 1
    assert after.problems[0].startswith("line 6: torn/unparseable record (not JSON")
    assert after.records == 6 and after.last_seq == 6


def test_torn_tail_from_other_writer_invalidates_cache(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, fsync=False) as log:
        first = log.append("-", "x")
        with open(path, "ab") as f:
            f.write(b"garbage")
        rec = log.append("-", "y")
    assert rec["seq"] == 2 and rec["prev"] == first["hash"]
    assert [p.split(":")[0] for p in verify(path).problems] == ["line 2"]


def test_tail_read_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_log(tmp_path / "audit.jsonl", 2000)
    big = path.stat().st_size
    read = 0
    real = os.pread

    def counting(fd: int, n: int, off: int) -> bytes:
        nonlocal read
        data = real(fd, n, off)
        read += len(data)
        return data

    monkeypatch.setattr(os, "pread", counting)
    with AuditLog(path, fsync=False, anchor=False) as log:  # the anchor reads a line of its own
        log.append("-", "x")
        log.append("-", "x")  # cache hit: no read at all
    assert read <= 4097 < big


def test_tail_read_grows_window_for_large_records(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, fsync=False) as log:
        for _ in range(3):
            log.append("-", "x", {"blob": "z" * 30_000})
    with AuditLog(path, fsync=False) as log:
        assert log.append("-", "x")["seq"] == 4
    assert verify(path).ok


# --------------------------------------------------------------------------- append_many


FILE_EVENTS = [
    ("file.open", {"syscall": "openat", "path": "/etc/passwd", "flags": "O_RDONLY",
                   "result": "ok", "pid": 3, "source": "ptrace"}, "allow", None),
    ("file.open", {"syscall": "openat", "path": "/etc/passwd", "flags": "O_WRONLY|O_CREAT",
                   "result": "EROFS", "pid": 3, "source": "ptrace"}, "deny", "filesystem.write"),
    ("exec", {"syscall": "execve", "path": "/bin/ls", "argv": ["ls", "-l"], "result": "ok",
              "pid": 4, "ppid": 3, "source": "ptrace"}, "allow", None),
]  # fmt: skip


def test_append_many_chains_like_append(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        first = log.append("sb1", "sandbox.created")
        batch = log.append_many("sb1", iter(FILE_EVENTS * 10))
        last = log.append("sb1", "sandbox.destroyed")
        assert log.append_many("sb1", []) == []
    assert [r["seq"] for r in batch] == list(range(2, 32))
    assert batch[0]["prev"] == first["hash"] and last["prev"] == batch[-1]["hash"]
    raw = lines_of(path)
    assert raw[1:31] == [canonical(r) + b"\n" for r in batch]
    for rec, (event, details, decision, rule) in zip(batch, FILE_EVENTS * 10, strict=True):
        assert (rec["sandbox"], rec["event"], rec["details"], rec["decision"], rec["rule"]) == (
            "sb1", event, details, decision, rule)  # fmt: skip
    result = verify(path)
    assert result.ok, result.problems
    assert result.last_seq == 32


def test_append_many_is_one_write_and_one_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, anchor=False)
    fd = log._fd
    calls: list[str] = []
    real_write, real_fsync = os.write, os.fsync

    def write(f: int, data: Any) -> int:
        if f == fd:
            calls.append("write")
        return real_write(f, data)

    def fsync(f: int) -> None:
        if f == fd:
            calls.append("fsync")
        real_fsync(f)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)
    log.append_many("sb", FILE_EVENTS * 100)
    assert calls == ["write", "fsync"]
    log.append("sb", "x")
    assert calls == ["write", "fsync"] * 2  # the single append: the same, per record
    log.close()
    assert verify(path).records == 301


def test_append_many_checks_every_item_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        with pytest.raises(AuditError, match=r"item 2: audit decision"):
            log.append_many("sb", [*FILE_EVENTS[:2], ("x", {}, "maybe", None)])
        with pytest.raises(AuditError, match=r"item 1: expected \(event, details"):
            log.append_many("sb", [FILE_EVENTS[0], ("x", {})])  # type: ignore[list-item]
        with pytest.raises(AuditError, match=r"item 0: audit details .* not JSON-serializable"):
            log.append_many("sb", [("x", {"s": {1}}, "info", None)])
        with pytest.raises(AuditError, match="sandbox"):
            log.append_many("", FILE_EVENTS)
    assert path.read_bytes() == b""


def test_append_many_truncates_oversized_details(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, fsync=False) as log:
        recs = log.append_many("sb", [("exec", {"argv": ["x" * 100_000]}, "allow", None)] * 3)
    assert all(r["details"]["_truncated"] for r in recs)
    assert all(len(line) <= MAX_RECORD_BYTES for line in lines_of(path))
    assert verify(path).ok


def _single_appender(path: str, stop: Any, count: Any) -> None:
    with AuditLog(path, fsync=False) as log:
        for i in range(20_000):  # bounded even if the parent never says stop
            if stop.is_set():
                break
            log.append("single", "command.started", {"i": i})
            with count.get_lock():
                count.value += 1


def test_append_many_interleaves_with_another_process(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    stop, count = ctx.Event(), ctx.Value("i", 0)
    child = ctx.Process(target=_single_appender, args=(str(path), stop, count))
    child.start()
    try:
        with AuditLog(path, fsync=False) as log:
            for b in range(30):
                # Let the other process get some records in between, so the
                # batches really are interleaved with its single appends.
                seen = count.value
                for _ in range(500):
                    if count.value > seen:
                        break
                    threading.Event().wait(0.01)
                log.append_many(f"batch{b}", FILE_EVENTS * 4)
    finally:
        stop.set()
        child.join(30)
    assert child.exitcode == 0
    result = verify(path)
    assert result.ok, result.problems
    recs = list(read_records(path))
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    singles = [r["seq"] for r in recs if r["sandbox"] == "single"]
    assert len(singles) == count.value
    for b in range(30):
        seqs = [r["seq"] for r in recs if r["sandbox"] == f"batch{b}"]
        assert seqs == list(range(seqs[0], seqs[0] + 12)), f"batch {b} was split"
    batch_starts = next(r["seq"] for r in recs if r["sandbox"] == "batch0")
    # a single record landed between batch 0 and batch 29
    last_batch = next(r["seq"] for r in recs if r["sandbox"] == "batch29")
    assert any(batch_starts < s < last_batch for s in singles)


# --------------------------------------------------------------------------- verify


def test_verify_empty_and_missing(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert verify(empty) == VerifyResult(True, 0, [], None, None, None, "none (no anchor key)")
    with pytest.raises(AuditError, match="does not exist"):
        verify(tmp_path / "nope.jsonl")


def test_verify_detects_changed_record(tmp_path: Path) -> None:
    log = make_log(tmp_path / "audit.jsonl")
    raw = lines_of(log)
    raw[4] = raw[4].replace(b'"5"', b'"rm -rf /"')
    result = verify(tampered(log, tmp_path, raw))
    assert result.problems == ["record seq=5 (line 5): hash mismatch — record was changed"]
    assert verify(log).ok  # the original is untouched


def test_verify_detects_changed_and_rehashed_record(tmp_path: Path) -> None:
    log = make_log(tmp_path / "audit.jsonl")
    raw = lines_of(log)
    rec = json.loads(raw[4])
    rec["details"]["argv"] = ["true"]
    rec["hash"] = hashlib.sha256(
        canonical({k: v for k, v in rec.items() if k != "hash"})
    ).hexdigest()
    raw[4] = canonical(rec) + b"\n"
    problems = verify(tampered(log, tmp_path, raw)).problems
    assert len(problems) == 1
    assert problems[0].startswith(
        "record seq=6 (line 6): prev link broken — prev does not match the hash of the record "
        "before it (seq=5, line 5)"
    )


def test_verify_detects_non_canonical_edit(tmp_path: Path) -> None:
    log = make_log(tmp_path / "audit.jsonl")
    raw = lines_of(log)
    raw[2] = raw[2].replace(b'"seq":3', b'"seq": 3')
    assert verify(tampered(log, tmp_path, raw)).problems == [
        "record seq=3 (line 3): not in canonical form — line was edited"
    ]


def test_verify_detects_deleted_record(tmp_path: Path) -> None:
    log = make_log(tmp_path / "audit.jsonl")
    raw = lines_of(log)
    del raw[4]
    problems = verify(tampered(log, tmp_path, raw)).problems
    assert problems[0] == "between line 4 and 5: seq jumps 4 -> 6 — 1 record deleted (seq 5)"
    assert problems[1].startswith("record seq=6 (line 5): prev link broken")
    assert len(problems) == 2


def test_verify_detects_deleted_range_and_head(tmp_path: Path) -> None:
    log = make_log(tmp_path / "audit.jsonl")
    raw = lines_of(log)
    problems = verify(tampered(log, tmp_path, raw[2:5] + raw[8:])).problems
    assert "before line 1: seq starts at 3 — 2 records deleted (seqs 1-2)" in problems
    assert "between line 3 and 4: seq jumps 5 -> 9 — 3 records deleted (seqs 6-8)" in problems
    assert any(p.startswith("record seq=3 (line 1): prev link broken") for p in problems)


def test_verify_detects_inserted_copy(tmp_path: Path) -> None:
    log = make_log(tmp_path / "audit.jsonl")
    raw = lines_of(log)
    raw.insert(5, raw[2])  # replay record 3 after record 5
    problems = verify(tampered(log, tmp_path, raw)).problems
    assert (
        "line 6: seq 3 appears again / out of order — record inserted (seq 3 also at line 3)"
        in (problems)
    )
    assert any(
        p.startswith("record seq=3 (line 6): prev link broken") and "links to seq=2 (line 2)" in p
        for p in problems
    )


def test_verify_detects_inserted_forgery(tmp_path: Path) -> None:
    log = make_log(tmp_path / "audit.jsonl")
    raw = lines_of(log)
    forged = json.loads(raw[4])  # a fake seq 5 placed before the real one
    forged["details"] = {"argv": ["innocent"]}
    raw.insert(4, canonical(forged) + b"\n")
    problems = verify(tampered(log, tmp_path, raw)).problems
    assert "record seq=5 (line 5): hash mismatch — record was changed" in problems
    assert any(
        p.startswith("line 6: seq 5 appears again / out of order — record inserted")
        for p in problems
    )


def test_verify_detects_swapped_records(tmp_path: Path) -> None:
    log = make_log(tmp_path / "audit.jsonl")
    raw = lines_of(log)
    raw[4], raw[5] = raw[5], raw[4]
    problems = verify(tampered(log, tmp_path, raw)).problems
    assert "line 5: seq 6 out of order — records reordered (seq 5 appears later, at line 6)" in (
        problems
    )
    assert not any("deleted" in p or "inserted" in p for p in problems)


def test_verify_detects_record_moved_earlier(tmp_path: Path) -> None:
    log = make_log(tmp_path / "audit.jsonl")
    raw = lines_of(log)
    raw.insert(4, raw.pop(6))  # seq 7 moved before seq 5
    problems = verify(tampered(log, tmp_path, raw)).problems
    assert problems[0] == (
        "line 5: seq 7 out of order — records reordered (seqs 5-6 appear later, at lines 6-7)"
    )
    assert not any("deleted" in p or "inserted" in p for p in problems)


def test_verify_detects_record_moved_later(tmp_path: Path) -> None:
    log = make_log(tmp_path / "audit.jsonl")
    raw = lines_of(log)
    raw.insert(6, raw.pop(3))  # seq 4 moved after seq 7
    problems = verify(tampered(log, tmp_path, raw)).problems
    assert "line 4: seq 5 out of order — records reordered (seq 4 appears later, at line 7)" in (
        problems
    )


def test_verify_reports_unparseable_lines_and_keeps_checking(tmp_path: Path) -> None:
    log = make_log(tmp_path / "audit.jsonl")
    raw = lines_of(log)
    raw.insert(3, b"not json\n")
    raw.insert(6, b'{"seq":1}\n')
    raw[8] = raw[8].replace(b'"7"', b'"x"')
    problems = verify(tampered(log, tmp_path, raw)).problems
    assert problems[0].startswith("line 4: torn/unparseable record (not JSON")
    assert problems[1].startswith("line 7: torn/unparseable record (missing field(s) ts")
    assert problems[2] == "record seq=7 (line 9): hash mismatch — record was changed"
    assert len(problems) == 3


def test_verify_or_raise(tmp_path: Path) -> None:
    log = make_log(tmp_path / "audit.jsonl")
    assert verify_or_raise(log).records == 10
    raw = lines_of(log)
    del raw[2]
    with pytest.raises(AuditIntegrityError) as info:
        verify_or_raise(tampered(log, tmp_path, raw))
    assert len(info.value.problems) == 2
    assert "seq jumps 2 -> 4" in str(info.value)


# --------------------------------------------------------------------------- query


def test_read_records_yields_errors_in_place(tmp_path: Path) -> None:
    log = make_log(tmp_path / "audit.jsonl", 3)
    with open(log, "ab") as f:
        f.write(b"junk\n{partial")
    recs = list(read_records(log))
    assert [r.get("seq") for r in recs] == [1, 2, 3, None, None]
    assert recs[3]["_line"] == 4 and "unparseable" in recs[3]["_error"]
    assert recs[4]["_line"] == 5 and "torn" in recs[4]["_error"]
    with pytest.raises(AuditError):
        read_records(tmp_path / "missing.jsonl")


def test_select_filters(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, fsync=False) as log:
        log.append("-", "sandbox.created", {"id": "abcdef123456"})
        log.append("abcdef123456", "command.started", {"argv": ["ls"]}, decision="allow")
        log.append("abcdef123456", "blocked", {"path": "/etc/shadow"}, decision="deny", rule="fs")
        log.append("zzz", "blocked", {"host": "evil"}, decision="deny", rule="net")
        log.append("zzz", "command.ended", {"exit_code": 1})
    with open(path, "ab") as f:
        f.write(b"junk\n")
    recs = list(read_records(path))
    assert len(select(recs)) == 6
    assert [r["seq"] for r in select(recs, sandbox="abcdef12")] == [2, 3]
    assert [r["seq"] for r in select(recs, blocked=True)] == [3, 4]
    assert [r["seq"] for r in select(recs, event_prefix="command.")] == [2, 5]
    assert [r["seq"] for r in select(recs, sandbox="zzz", blocked=True)] == [4]


def test_format_table(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, fsync=False) as log:
        log.append("abcdef123456", "command.started", {"argv": ["echo", "hi there"], "pid": 7})
        log.append("abcdef123456", "command.ended", {"exit_code": 3, "argv": ["echo"]})
        log.append("abcdef123456", "blocked", {"path": "/x\x1b[2J\u202e"}, decision="deny",
                   rule="fs.deny")  # fmt: skip
        log.append("-", "anomaly", {"reason": "r" * 500})
    with open(path, "ab") as f:
        f.write(b"junk\n")
    table = format_table(read_records(path))
    lines = table.splitlines()
    assert len(lines) == 6
    assert lines[0].split() == ["SEQ", "TIME", "SANDBOX", "EVENT", "DECISION", "RULE", "DETAILS"]
    assert re.match(r"^\s*1  \d\d:\d\d:\d\d\.\d{3}  abcdef12  command\.started", lines[1])
    assert lines[1].endswith("echo 'hi there' pid=7")
    assert lines[2].endswith("echo exit=3")
    assert "deny" in lines[3] and "fs.deny" in lines[3]
    assert "\x1b" not in table and "\u202e" not in table
    assert "path=/x\\x1b[2J\\u202e" in lines[3]
    assert len(lines[4]) == 160 and lines[4].endswith("…")
    assert "line 5: unparseable record" in lines[5]
    assert all(len(line) <= 160 for line in lines)
    assert format_table([]) == "(no records)"
