"""The snapshot store on its own: signature, one-open verification, key, limits.

No sandbox here: entries are written the way a backend writes them (files
in a staging dir's ``data``), so every rule of the store is tried apart from
the tiers.  Each refusal has its harmless twin.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from glassroom import SnapshotError, SnapshotIntegrityError, SnapshotLimits, SnapshotStore
from glassroom.lifecycle.snapshots import _sha256, discard


def _save(store: SnapshotStore, tenant: str = "t", payload: bytes = b"memory image",
          kind: str = "snapshot") -> str:  # fmt: skip
    st = store.begin(kind, tenant)
    (st.data / "vm.state").write_bytes(payload)
    info = store.commit(st, names=["n"], sandbox_id="sb-0123456789ab", tier="test",
                        memory=True, memory_refused=None, extra={"policy": {}})  # fmt: skip
    return info.id


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SnapshotStore:
    monkeypatch.setenv("GLASSROOM_STATE_DIR", str(tmp_path / "state"))
    return SnapshotStore(tmp_path / "snaps")


def test_open_gives_a_private_verified_copy(store: SnapshotStore, tmp_path: Path) -> None:
    sid = _save(store)
    info, manifest, work = store.open(sid, tenant="t")
    try:
        assert info.id == sid and manifest["info"]["tenant"] == "t"
        assert (work / "data" / "vm.state").read_bytes() == b"memory image"
        assert not str(work).startswith(str(store.root))  # outside the store
        assert (work.stat().st_mode & 0o777) == 0o700
        # A swap after the check changes the store, never the copy in use.
        (store.root / sid / "data" / "vm.state").write_bytes(b"evil image!!")
        assert (work / "data" / "vm.state").read_bytes() == b"memory image"
    finally:
        discard(work)
    with pytest.raises(SnapshotIntegrityError, match="does not match its hash"):
        store.open(sid)


def test_hardlinked_or_symlinked_file_is_refused(store: SnapshotStore, tmp_path: Path) -> None:
    sid = _save(store)
    store.verify(sid)  # harmless twin
    f = store.root / sid / "data" / "vm.state"
    os.link(f, tmp_path / "second-name")
    with pytest.raises(SnapshotIntegrityError, match="one name"):
        store.verify(sid)
    os.unlink(tmp_path / "second-name")
    store.verify(sid)
    outside = tmp_path / "outside"
    outside.write_bytes(f.read_bytes())
    f.unlink()
    f.symlink_to(outside)
    with pytest.raises(SnapshotIntegrityError, match=r"cannot be opened|regular file"):
        store.verify(sid)


def test_swapped_key_is_refused(store: SnapshotStore) -> None:
    sid = _save(store)
    key = store.root / ".key"
    store.verify(sid)
    # Someone who can write the dir replaces the key (and re-signs with theirs).
    os.rename(key, store.root / ".key-old")
    os.symlink(store.root / ".key-old", key)
    fresh = SnapshotStore(store.root)
    with pytest.raises(SnapshotIntegrityError, match=r"key cannot be read .Too many levels"):
        fresh.verify(sid)
    key.unlink()
    os.rename(store.root / ".key-old", key)
    os.chmod(key, 0o644)
    with pytest.raises(SnapshotIntegrityError, match="not the one this store made"):
        SnapshotStore(store.root).verify(sid)
    os.chmod(key, 0o600)
    SnapshotStore(store.root).verify(sid)


def test_unsigned_tenant_change_is_refused(store: SnapshotStore) -> None:
    sid = _save(store, tenant="alice")
    m = store.root / sid / "manifest.json"
    doc = json.loads(m.read_text())
    doc["info"]["tenant"] = "bob"
    m.write_text(json.dumps(doc))
    with pytest.raises(SnapshotError):
        store.open(sid, tenant="bob")


def test_count_limit_holds_under_concurrent_saves(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "s", SnapshotLimits(max_count=3))
    ok, refused = [], []

    def one() -> None:
        try:
            ok.append(_save(SnapshotStore(store.root, store.limits)))
        except SnapshotError as exc:
            refused.append(exc.rule)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(ok) == 3 and refused == ["snapshot.limit"] * 5
    assert len(store.list(tenant="t")) == 3


def test_byte_limit_counts_paused_images(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "s", SnapshotLimits(max_bytes=64 << 10))
    _save(store, kind="pause", payload=os.urandom(40 << 10))
    with pytest.raises(SnapshotError, match="paused sandboxes") as exc:
        _save(store, payload=os.urandom(40 << 10))
    assert exc.value.rule == "snapshot.limit"
    _save(store, payload=b"small")  # harmless twin: still room for this


def test_sparse_digest_is_layout_independent(tmp_path: Path) -> None:
    sparse, dense = tmp_path / "sparse", tmp_path / "dense"
    with open(sparse, "wb") as f:
        f.truncate(64 << 20)
        f.seek(10 << 20)
        f.write(b"data in the middle")
    dense.write_bytes(sparse.read_bytes())  # same content, no holes
    assert _sha256(sparse) == _sha256(dense)
    with open(dense, "r+b") as f:
        f.seek(40 << 20)
        f.write(b"\x01")
    assert _sha256(sparse) != _sha256(dense)


@pytest.mark.parametrize("size", [1, 65535, 65537, (1 << 20) + 4096])
def test_digest_of_a_partial_last_chunk_is_layout_independent(tmp_path: Path, size: int) -> None:
    hole, zeros = tmp_path / "hole", tmp_path / "zeros"
    with open(hole, "wb") as f:
        f.truncate(size)  # all hole
    zeros.write_bytes(bytes(size))  # the same content, allocated
    assert _sha256(hole) == _sha256(zeros)


def test_failed_begin_gives_its_slot_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SnapshotStore(tmp_path / "s", SnapshotLimits(max_count=1))
    real_mkdir = Path.mkdir

    def fail_once(self: Path, *a: object, **kw: object) -> None:
        if self.name.startswith(".tmp-"):
            monkeypatch.setattr(Path, "mkdir", real_mkdir)
            raise OSError(28, "No space left on device")
        real_mkdir(self, *a, **kw)  # type: ignore[arg-type]

    store._ensure_root()
    monkeypatch.setattr(Path, "mkdir", fail_once)
    with pytest.raises(OSError):
        store.begin("snapshot", "t")
    _save(store)  # the slot was given back
