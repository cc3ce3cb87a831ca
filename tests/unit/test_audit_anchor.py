"""The signed anchor of the audit chain's head: the key, the anchor file, verification.

The acceptance test is :func:`test_full_rewrite_with_recomputed_chain_is_caught_by_the_anchor`:
a log rewritten entirely, every hash recomputed so the chain alone checks
out, is caught through the anchor.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from glassroom._errors import AuditError, AuditIntegrityError
from glassroom.audit import (
    AuditLog,
    anchor_path,
    load_or_create_key,
    read_records,
    record_hash,
    verify,
    verify_or_raise,
)
from glassroom.interfaces.cli import main

#: Every test gets its own state dir (tests/unit/conftest.py).
pytestmark = pytest.mark.usefixtures("state")


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode()


def write_log(path: Path, n: int = 10, **kw: Any) -> list[dict[str, Any]]:
    with AuditLog(path, fsync=False, **kw) as log:
        return [
            log.append(f"sb{i % 2}", "command.started", {"argv": ["echo", str(i)]})
            for i in range(1, n + 1)
        ]


def read_anchor(log: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(anchor_path(log).read_bytes())
    return data


def rewrite(path: Path, change: Any) -> None:
    """Rewrite the WHOLE log as an attacker with write access would: apply
    ``change`` to the records, then recompute every prev link and hash."""
    records = [r for r in read_records(path)]
    records = change(records)
    prev = "0" * 64
    lines = []
    for seq, rec in enumerate(records, start=1):
        rec = dict(rec, seq=seq, prev=prev)
        rec["hash"] = record_hash(rec)
        prev = rec["hash"]
        lines.append(canonical(rec) + b"\n")
    path.write_bytes(b"".join(lines))


def chain_only(path: Path, tmp_path: Path) -> Any:
    """Verify a copy of the log where no anchor key is configured: the chain alone."""
    copy = tmp_path / "chain-only" / path.name
    copy.parent.mkdir(exist_ok=True)
    copy.write_bytes(path.read_bytes())
    saved = os.environ["GLASSROOM_STATE_DIR"]
    os.environ["GLASSROOM_STATE_DIR"] = str(tmp_path / "no-key-here")
    try:
        return verify(copy)
    finally:
        os.environ["GLASSROOM_STATE_DIR"] = saved


# --------------------------------------------------------------------------- the key


def test_key_is_created_once_private_and_atomic(state: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_log(tmp_path / "audit.jsonl", 2)
    finally:
        os.umask(old)
    key_file, pub_file = state / "audit-anchor.key", state / "audit-anchor.pub"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub_file.stat().st_mode) == 0o644
    assert key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub_file.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert sorted(p.name for p in state.iterdir()) == ["audit-anchor.key", "audit-anchor.pub"]
    private = serialization.load_pem_private_key(key_file.read_bytes(), None)
    assert isinstance(private, Ed25519PrivateKey)
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    key = load_or_create_key()
    assert key.key_id == hashlib.sha256(raw).hexdigest()[:16]
    assert read_anchor(tmp_path / "audit.jsonl")["key_id"] == key.key_id
    before = key_file.read_bytes()
    write_log(tmp_path / "other.jsonl", 1)
    assert key_file.read_bytes() == before


def _key_id_in_child(out: Any) -> None:
    out.put(load_or_create_key().key_id)


def test_processes_racing_to_create_the_key_share_one(state: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_key_id_in_child, args=(out,)) for _ in range(8)]
    for p in procs:
        p.start()
    ids = {out.get(timeout=30) for _ in procs}
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len(ids) == 1
    assert ids == {load_or_create_key().key_id}
    assert not [p for p in state.iterdir() if p.name.endswith(".tmp")]


def test_key_path_can_be_moved_by_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "persistent" / "anchor.key"
    monkeypatch.setenv("GLASSROOM_AUDIT_ANCHOR_KEY", str(key))
    write_log(tmp_path / "audit.jsonl", 1)
    assert key.exists() and (tmp_path / "persistent" / "anchor.pub").exists()
    assert verify(tmp_path / "audit.jsonl").anchored_seq == 1


def test_state_dir_that_cannot_hold_a_key_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("GLASSROOM_STATE_DIR", str(blocker / "state"))
    with pytest.raises(AuditError, match=r"audit anchor key .*a-file/state/audit-anchor\.key"):
        AuditLog(tmp_path / "audit.jsonl")
    assert not (tmp_path / "audit.jsonl").exists()  # nothing was opened
    # Opting out still works without a key.
    write_log(tmp_path / "audit.jsonl", 1, anchor=False)
    assert not anchor_path(tmp_path / "audit.jsonl").exists()


def _open_as_nobody(log: str, state: str, out: Any) -> None:
    try:
        if os.geteuid() == 0:
            os.setgid(65534)
            os.setuid(65534)
        os.environ["GLASSROOM_STATE_DIR"] = state
        AuditLog(log)
        out.put("no error")
    except AuditError as exc:
        out.put(f"AuditError: {exc}")
    except BaseException as exc:  # a crash is what this test is about
        out.put(f"crash: {type(exc).__name__}: {exc}")


def test_unwritable_state_dir_is_a_clear_error_not_a_crash() -> None:
    """A real permission denial: a 0755 state dir the writer does not own.

    As root the writer drops to uid 65534 in a child; otherwise it runs as is
    against a directory made read-only."""
    top = Path(tempfile.mkdtemp(prefix="glassroom-anchor-test-", dir="/tmp"))
    try:
        os.chmod(top, 0o777)
        state = top / "state"
        state.mkdir(mode=0o755)
        if os.geteuid() != 0:
            os.chmod(state, 0o555)
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        p = ctx.Process(target=_open_as_nobody, args=(str(top / "audit.jsonl"), str(state), out))
        p.start()
        message = out.get(timeout=30)
        p.join(30)
        assert message.startswith("AuditError: audit anchor key "), message
        assert "Permission denied" in message and "GLASSROOM_AUDIT_ANCHOR_KEY" in message
    finally:
        os.chmod(top / "state", 0o755)
        for child in sorted(top.rglob("*"), reverse=True):
            child.unlink() if child.is_file() else child.rmdir()
        top.rmdir()


def test_key_readable_by_others_is_refused(state: Path, tmp_path: Path) -> None:
    load_or_create_key()
    os.chmod(state / "audit-anchor.key", 0o644)
    with pytest.raises(AuditError, match=r"readable by others \(mode 0644\); chmod 600"):
        AuditLog(tmp_path / "audit.jsonl")


def test_public_key_of_another_key_is_refused(state: Path, tmp_path: Path) -> None:
    load_or_create_key()
    other = Ed25519PrivateKey.generate().public_key()
    (state / "audit-anchor.pub").write_bytes(
        other.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    # A new process (no cache) must notice.
    from glassroom.audit import _anchor

    _anchor._cache.clear()
    with pytest.raises(AuditError, match="does not belong to the private key"):
        AuditLog(tmp_path / "audit.jsonl")


# --------------------------------------------------------------------------- the anchor file


def test_close_writes_a_signed_anchor_of_the_head(state: Path, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    recs = write_log(path, 5)
    anchor = read_anchor(path)
    assert set(anchor) == {"v", "log", "seq", "hash", "offset", "ts", "key_id", "sig"}
    assert (anchor["log"], anchor["seq"], anchor["hash"]) == ("audit.jsonl", 5, recs[-1]["hash"])
    assert anchor["offset"] == path.stat().st_size
    assert anchor_path(path).read_bytes() == canonical(anchor) + b"\n"
    # The signature is plain Ed25519 over the canonical JSON of the other fields.
    pub = serialization.load_pem_public_key((state / "audit-anchor.pub").read_bytes())
    body = canonical({k: v for k, v in anchor.items() if k != "sig"})
    pub.verify(bytes.fromhex(anchor["sig"]), body)  # type: ignore[union-attr]
    res = verify(path)
    assert res.ok, res.problems
    assert res.anchored_seq == 5
    assert res.anchor_status == f"seq 5 signed by key {anchor['key_id']}, ok"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_first_append_anchors_so_a_live_log_is_never_unanchored(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, fsync=False)
    try:
        assert not anchor_path(path).exists()  # empty log: nothing to anchor
        log.append("-", "x")
        assert read_anchor(path)["seq"] == 1
        log.append("-", "y")
        res = verify(path)  # the writer is still open
        assert res.ok, res.problems
        assert (res.anchored_seq, res.last_seq) == (1, 2)
        assert res.anchor_status is not None
        assert res.anchor_status.endswith("ok; 1 later record not anchored yet")
    finally:
        log.close()
    assert verify(path).anchored_seq == 2


def test_anchor_is_cheap_and_only_moves_forward(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, fsync=False) as log:
        log.append("-", "x")
        first = log.anchor()
        assert first is not None and first["seq"] == 1
        inode = anchor_path(path).stat().st_ino
        for _ in range(100):
            assert log.anchor() == first
        assert anchor_path(path).stat().st_ino == inode  # not rewritten
        log.append("-", "y")
        second = log.anchor()
        assert second is not None and second["seq"] == 2
        assert anchor_path(path).stat().st_ino != inode  # replaced by rename


def test_two_writers_never_lower_the_anchor(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    a, b = AuditLog(path, fsync=False), AuditLog(path, fsync=False)
    a.append("-", "a1")
    b.append("-", "b1")
    b.append("-", "b2")
    assert b.anchor()["seq"] == 3  # type: ignore[index]
    assert a.anchor()["seq"] == 3  # type: ignore[index]  # a sees the file's head, not its own
    b.close()
    a.close()
    assert read_anchor(path)["seq"] == 3
    assert verify(path).ok


def test_close_covered_by_a_later_anchor_signs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers closing together: the first anchors the head; one whose records
    that anchor covers does not sign again, and the anchor still ends up at the
    head, which verifies."""
    from glassroom.audit import _anchor

    path = tmp_path / "audit.jsonl"
    a, b, c = AuditLog(path, fsync=False), AuditLog(path, fsync=False), AuditLog(path, fsync=False)
    a.append("-", "a1")
    b.append("-", "b1")
    writes: list[int] = []
    real = _anchor.stage_anchor

    def counting(p: Path, anchor: dict[str, Any], *, fsync: bool = True) -> str:
        writes.append(anchor["seq"])
        return real(p, anchor, fsync=fsync)

    monkeypatch.setattr(_anchor, "stage_anchor", counting)
    b.close()  # anchors seq 2, which covers a1 as well
    a.close()
    assert writes == [2]
    c.append("-", "c1")  # after that anchor: c's close must sign again
    c.close()
    assert writes == [2, 3]
    assert read_anchor(path)["seq"] == 3  # type: ignore[index]
    assert verify(path).ok


def test_anchor_is_made_durable_outside_the_log_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new anchor's fsyncs happen without the log's flock: appends of other
    writers do not wait for them.  The rename is under the lock."""
    import fcntl

    from glassroom.audit import _anchor

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append("-", "a")
    log.append("-", "b")
    other = os.open(path, os.O_RDONLY)
    real = _anchor.stage_anchor
    free: list[bool] = []

    def staging(p: Path, anchor: dict[str, Any], *, fsync: bool = True) -> str:
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            free.append(False)
        else:
            fcntl.flock(other, fcntl.LOCK_UN)
            free.append(True)
        return real(p, anchor, fsync=fsync)

    monkeypatch.setattr(_anchor, "stage_anchor", staging)
    got = log.anchor()
    os.close(other)
    assert free == [True]
    assert got is not None and got["seq"] == 2 and read_anchor(path) == got
    log.close()
    assert verify(path).ok
    assert not list(tmp_path.glob(".*.tmp"))  # no staged file left behind


def test_anchor_staged_while_another_writer_anchors_further_keeps_the_higher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between staging its anchor and renaming it in place, another writer
    anchored a later head: the later anchor stays (never lowered)."""
    from glassroom.audit import _anchor

    path = tmp_path / "audit.jsonl"
    a, b = AuditLog(path, fsync=False), AuditLog(path, fsync=False)
    a.append("-", "a1")
    real = _anchor.stage_anchor
    raced: list[int] = []

    def staging(p: Path, anchor: dict[str, Any], *, fsync: bool = True) -> str:
        tmp = real(p, anchor, fsync=fsync)
        if not raced:
            raced.append(anchor["seq"])
            b.append("-", "b1")
            assert b.anchor()["seq"] == 3  # type: ignore[index]
        return tmp

    monkeypatch.setattr(_anchor, "stage_anchor", staging)
    a.append("-", "a2")  # seq 2; b1 (in the race) is seq 3
    got = a.anchor()
    assert raced == [2]
    assert got is not None and got["seq"] == 3 == read_anchor(path)["seq"]  # type: ignore[index]
    a.close()
    b.close()
    assert verify(path).ok
    assert not list(tmp_path.glob(".*.tmp"))


def test_close_signs_again_when_the_anchor_file_changed(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    a, b = AuditLog(path, fsync=False), AuditLog(path, fsync=False)
    a.append("-", "a1")
    b.append("-", "b1")
    b.close()
    anchor_path(path).unlink()  # what the cached anchor said is no longer on disk
    a.close()
    assert read_anchor(path)["seq"] == 2  # type: ignore[index]
    assert verify(path).ok


def _append_and_close(path: str, n: int) -> None:
    with AuditLog(path, fsync=False) as log:
        for i in range(25):
            log.append(f"proc{n}", "x", {"i": i})
            if i % 10 == 0:
                log.anchor()


def test_many_processes_appending_and_anchoring(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_and_close, args=(str(path), n)) for n in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    res = verify(path)
    assert res.ok, res.problems
    assert res.anchored_seq == res.last_seq == 100  # the last closer anchored the head


def test_writer_refuses_to_sign_over_a_rewritten_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, fsync=False)
    for i in range(5):
        log.append("sb", "x", {"i": i})
    log.anchor()
    before = anchor_path(path).read_bytes()

    def forge(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        recs[1]["details"] = {"i": "forged"}
        return recs

    rewrite(path, forge)
    log.append("sb", "x", {"i": 5})  # the writer chains on, unaware
    with pytest.raises(AuditError, match=r"anchor says seq 5 has hash .*not re-anchoring"):
        log.anchor()
    with pytest.raises(AuditError, match="not re-anchoring"):
        log.close()  # the file is still closed
    assert anchor_path(path).read_bytes() == before  # the evidence is kept
    with pytest.raises(AuditError, match="closed"):
        log.append("-", "x")


def test_writer_refuses_to_lower_the_anchor_of_a_truncated_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 6)
    before = anchor_path(path).read_bytes()
    rewrite(path, lambda recs: recs[:3])
    with pytest.raises(AuditError, match=r"ends at seq 3 but its anchor says seq 6"):
        AuditLog(path, fsync=False).close()
    assert anchor_path(path).read_bytes() == before


def test_malformed_anchor_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 2)
    anchor_path(path).write_text("{not json")
    log = AuditLog(path, fsync=False)
    log.append("-", "x")  # appending is not blocked by the anchor
    with pytest.raises(AuditError, match="is not a valid anchor"):
        log.anchor()
    with pytest.raises(AuditError, match="is not a valid anchor"):
        log.close()
    assert anchor_path(path).read_text() == "{not json"
    res = verify(path)
    assert not res.ok
    assert any("is not a valid anchor (not JSON" in p for p in res.problems)


def test_anchor_off_writes_no_key_and_no_anchor(state: Path, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, anchor=False) as log:
        log.append("-", "x")
        assert log.anchor() is None
    assert not state.exists() and not anchor_path(path).exists()
    res = verify(path)
    assert res.ok and res.anchored_seq is None
    assert res.anchor_status == "none (no anchor key)"


# --------------------------------------------------------------------------- verification


def test_full_rewrite_with_recomputed_chain_is_caught_by_the_anchor(tmp_path: Path) -> None:
    """THE ACCEPTANCE TEST: rewrite everything, chain and all; the anchor catches it."""
    path = tmp_path / "audit.jsonl"
    original = write_log(path, 12)
    assert verify(path).ok

    def forge(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for rec in recs:
            rec = dict(rec, ts="2020-01-01T00:00:00.000000Z")  # every record changed
            if rec["seq"] == 4:
                rec["details"] = {"argv": ["echo", "nothing to see"]}
            out.append(rec)
        return out

    rewrite(path, forge)
    forged = list(read_records(path))
    assert [r["hash"] for r in forged] != [r["hash"] for r in original]
    assert chain_only(path, tmp_path).ok  # the bare chain cannot tell

    res = verify(path)
    assert not res.ok
    assert res.problems == [
        f"the log was rewritten or truncated: anchor says seq 12 has hash "
        f"{original[-1]['hash']}, but the log's seq 12 has hash {forged[-1]['hash']}"
    ]
    assert res.anchor_status is not None and res.anchor_status.endswith("FAILED")
    with pytest.raises(AuditIntegrityError, match="rewritten or truncated"):
        verify_or_raise(path)


def test_truncation_from_the_end_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 8)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:5]))  # a plain cut: the chain that is left is fine
    assert chain_only(path, tmp_path).ok
    res = verify(path)
    assert res.problems == [
        f"the log was rewritten or truncated: anchor says seq 8 has hash "
        f"{read_anchor(path)['hash']}, but the log has no record with seq 8 (last seq 5)"
    ]


def test_emptied_log_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    path.write_bytes(b"")
    res = verify(path)
    assert not res.ok
    assert "no record with seq 3 (last seq none)" in res.problems[0]


def test_records_after_the_anchor_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 4)
    write_log(path, 3, anchor=False)  # a writer that does not anchor appends more
    res = verify(path)
    assert res.ok, res.problems
    assert (res.anchored_seq, res.last_seq) == (4, 7)
    assert res.anchor_status is not None
    assert res.anchor_status.endswith(", ok; 3 later records not anchored yet")


def test_deleted_anchor_is_reported_when_the_key_exists(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    anchor_path(path).unlink()
    res = verify(path)
    assert not res.ok
    assert len(res.problems) == 1
    assert res.problems[0].startswith(f"no anchor file {anchor_path(path)}, but the anchor key ")
    assert "deleted" in res.problems[0]
    assert res.anchor_status == "MISSING"
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert verify(empty).ok  # an empty log needs no anchor


def test_changed_anchor_fails_its_signature(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    anchor = read_anchor(path)
    anchor["ts"] = "2030-01-01T00:00:00.000000Z"
    anchor_path(path).write_bytes(canonical(anchor) + b"\n")
    res = verify(path)
    assert res.problems == [
        f"anchor signature does not verify with key {anchor['key_id']}: the anchor was changed"
    ]


def test_anchor_forged_with_another_key_is_caught(tmp_path: Path) -> None:
    """The attacker rewrites the log AND signs a fresh anchor with a key of their own."""
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    genuine = read_anchor(path)
    rewrite(path, lambda recs: recs[:2])
    forger = load_or_create_key(tmp_path / "forger" / "k.key")
    recs = list(read_records(path))
    fake = forger.sign({"v": 1, "log": path.name, "seq": 2, "hash": recs[-1]["hash"],
                        "offset": path.stat().st_size, "ts": "2030-01-01T00:00:00.000000Z"})  # fmt: skip
    anchor_path(path).write_bytes(canonical(fake) + b"\n")
    res = verify(path)
    assert res.problems == [
        f"anchor was signed by key {forger.key_id}, not by the anchor public key "
        f"{genuine['key_id']}: the anchor was forged, or the key was replaced"
    ]
    # ... and with the forger's key passed explicitly, it checks out (by design).
    assert verify(path, pubkey=tmp_path / "forger" / "k.pub").ok


def test_pubkey_can_be_passed_as_file_bytes_or_key(
    state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    pem = (state / "audit-anchor.pub").read_bytes()
    key = serialization.load_pem_public_key(pem)
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    raw_file = tmp_path / "raw.pub"
    raw_file.write_bytes(raw)
    # Elsewhere, without the supervisor's state dir:
    monkeypatch.setenv("GLASSROOM_STATE_DIR", str(tmp_path / "elsewhere"))
    unchecked = verify(path)
    assert unchecked.ok  # the seq/hash still match; the signature could not be checked
    assert (
        unchecked.anchor_status is not None and "signature not checked" in unchecked.anchor_status
    )
    for source in (state / "audit-anchor.pub", str(raw_file), pem, raw, raw.hex().encode(), key):
        res = verify(path, pubkey=source)  # type: ignore[arg-type]
        assert res.ok, (source, res.problems)
        assert res.anchor_status is not None and "signature not checked" not in res.anchor_status
    with pytest.raises(AuditError, match="does not exist"):
        verify(path, pubkey=tmp_path / "nope.pub")
    with pytest.raises(AuditError, match="not an Ed25519 public key"):
        verify(path, pubkey=b"garbage")


def test_cli_verify_prints_the_anchor_and_fails_on_a_rewrite(
    state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 42)
    kid = read_anchor(path)["key_id"]
    assert main(["audit", "verify", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{path}: ok, 42 records, chain intact (last seq 42)",
        f"anchor: seq 42 signed by key {kid}, ok",
    ]
    assert main(["audit", "verify", "--json", str(path)]) == 0
    js = json.loads(capsys.readouterr().out)
    assert (js["ok"], js["anchored_seq"], js["anchor"]) == (
        True,
        42,
        f"seq 42 signed by key {kid}, ok",
    )

    rewrite(path, lambda recs: [dict(r, sandbox="innocent") for r in recs])
    assert main(["audit", "verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAILED, 1 problem(s)" in out
    assert "the log was rewritten or truncated: anchor says seq 42 has hash" in out
    assert f"anchor: seq 42 signed by key {kid}, FAILED" in out

    # --pubkey: from somewhere that has only the public key.
    other_state = tmp_path / "other-state"
    os.environ["GLASSROOM_STATE_DIR"] = str(other_state)
    good = tmp_path / "good.jsonl"
    write_log(good, 2)  # signed by the other state's key
    os.environ["GLASSROOM_STATE_DIR"] = str(state)
    assert main(["audit", "verify", str(good)]) == 1  # wrong key for this log
    assert "anchor was signed by key" in capsys.readouterr().out
    assert (
        main(["audit", "verify", "--pubkey", str(other_state / "audit-anchor.pub"), str(good)]) == 0
    )
    capsys.readouterr()
    assert main(["audit", "verify", "--pubkey", str(tmp_path / "missing.pub"), str(good)]) == 125
