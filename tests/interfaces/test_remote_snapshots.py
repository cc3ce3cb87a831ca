"""The remote SDK's pause, resume, snapshot and fork, against a real ``glassroom
serve`` (the module's ``serve`` fixture), on the namespaces tier (the default).

What is checked is what a user of ``Sandbox(url=...)`` relies on: the same
calls as in-process (docs/snapshots.md), the same exception tree (a refused
snapshot is a ``SnapshotError`` with its rule, a missing one is never mistaken
for a destroyed sandbox), and a tenant never reaching another's snapshots.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from glassroom import Sandbox
from glassroom._errors import SandboxClosed, SandboxError, SnapshotError
from glassroom._remote import RemoteSandbox
from glassroom.lifecycle.snapshots import SnapshotInfo

from .serve_helpers import Server

MISSING = "snap-0123456789abcdef"


@pytest.fixture
def sb(serve: Server) -> Iterator[RemoteSandbox]:
    box = Sandbox(url=serve.url, api_key=serve.keys["alice"])
    assert isinstance(box, RemoteSandbox)
    try:
        yield box
    finally:
        box.destroy()


def _alice(serve: Server) -> dict[str, str]:
    return {"url": serve.url, "api_key": serve.keys["alice"]}


def _cleanup(serve: Server, *ids: str) -> None:
    for i in ids:
        RemoteSandbox.delete_snapshot(i, **_alice(serve))


def test_pause_and_resume_keep_the_sandbox(serve: Server, sb: RemoteSandbox) -> None:
    sb.files.write("/workspace/keep.txt", "kept")
    assert sb.state == "running" and sb.paused is False
    info = sb.pause()
    assert info["state"] == "paused" and info["sandbox_id"] == sb.id
    assert sb.state == "paused" and sb.paused is True
    # a paused sandbox runs nothing: a clear refusal, not a hang or a 500
    with pytest.raises(SnapshotError) as ei:
        sb.run(["true"])
    assert ei.value.rule == "snapshot.state"
    with pytest.raises(SnapshotError) as ei:
        sb.pause()
    assert ei.value.rule == "snapshot.state"
    info = sb.resume()
    assert info["state"] == "running" and info["sandbox_id"] == sb.id
    assert sb.state == "running"
    r = sb.run(["cat", "keep.txt"])
    assert (r.exit_code, r.stdout) == (0, "kept")
    with pytest.raises(SnapshotError) as ei:
        sb.resume()  # not paused
    assert ei.value.rule == "snapshot.state"
    assert not serve.errors()


def test_pause_without_memory_keeps_the_files(serve: Server, sb: RemoteSandbox) -> None:
    sb.files.write("/workspace/f", "files only")
    assert sb.pause(memory=False)["state"] == "paused"
    info = sb.resume(timeout_s=120)
    assert info["state"] == "running" and 100 < info["timeout_s"] <= 120
    assert sb.files.read_text("/workspace/f") == "files only"
    assert not serve.errors()


def test_snapshot_is_files_only_on_namespaces_and_says_why(
    serve: Server, sb: RemoteSandbox
) -> None:
    sb.files.write("/workspace/a.txt", "A")
    info = sb.snapshot(name="after-setup")
    try:
        assert isinstance(info, SnapshotInfo)
        assert info.id.startswith("snap-") and info.names == ["after-setup"]
        assert (info.kind, info.tier, info.sandbox_id) == ("snapshot", "namespaces", sb.id)
        assert info.memory is False and info.memory_refused
        assert info.size_bytes > 0 and info.created_at > 0
        # asking for memory on a tier that cannot save processes is refused, with the rule
        with pytest.raises(SnapshotError) as ei:
            sb.snapshot(memory=True)
        assert ei.value.rule == "snapshot.memory"
        # the sandbox goes on running after a snapshot
        assert sb.state == "running" and sb.run(["cat", "a.txt"]).stdout == "A"
    finally:
        _cleanup(serve, info.id)
    assert not serve.errors()


def test_list_get_and_delete_snapshots(serve: Server, sb: RemoteSandbox) -> None:
    one = sb.snapshot(name="one")
    two = sb.snapshot(name="two")
    try:
        mine = RemoteSandbox.list_snapshots(**_alice(serve), sandbox_id=sb.id)
        assert [i.id for i in mine] == [two.id, one.id]  # newest first
        named = RemoteSandbox.list_snapshots(**_alice(serve), name="one")
        assert [i.id for i in named] == [one.id]
        assert RemoteSandbox.get_snapshot(one.id, **_alice(serve)) == one
        assert RemoteSandbox.delete_snapshot(one.id, **_alice(serve)) is True
        assert RemoteSandbox.delete_snapshot(one.id, **_alice(serve)) is False
        with pytest.raises(SnapshotError) as ei:
            RemoteSandbox.get_snapshot(one.id, **_alice(serve))
        assert ei.value.rule == "snapshot.not_found"
        assert not isinstance(ei.value, SandboxClosed)
        left = RemoteSandbox.list_snapshots(**_alice(serve), sandbox_id=sb.id)
        assert [i.id for i in left] == [two.id]
    finally:
        _cleanup(serve, one.id, two.id)
    assert not serve.errors()


def test_from_snapshot_is_a_new_sandbox_with_the_files(serve: Server, sb: RemoteSandbox) -> None:
    sb.files.write("/workspace/data.txt", "saved")
    sb.run(["sh", "-c", "echo tmp > /tmp/t"])
    plain = sb.snapshot()
    with_tmp = sb.snapshot(include_tmp=True)
    try:
        with RemoteSandbox.from_snapshot(plain.id, **_alice(serve)) as again:
            assert again.id != sb.id and again.state == "running"
            assert again.files.read_text("/workspace/data.txt") == "saved"
            assert again.run(["cat", "/tmp/t"]).exit_code != 0  # /tmp only when asked
            # its own trail, which names where it came from
            created = [r for r in again.audit() if r["event"] == "sandbox.created"]
            assert created and created[0]["details"].get("snapshot") == plain.id, created
        with RemoteSandbox.from_snapshot(with_tmp.id, **_alice(serve)) as again:
            assert again.run(["cat", "/tmp/t"]).stdout == "tmp\n"
        # the parent was not touched
        assert sb.files.read_text("/workspace/data.txt") == "saved"
    finally:
        _cleanup(serve, plain.id, with_tmp.id)
    with pytest.raises(SnapshotError) as ei:
        RemoteSandbox.from_snapshot(MISSING, **_alice(serve))
    assert ei.value.rule == "snapshot.not_found"
    with pytest.raises(SandboxError):
        RemoteSandbox.from_snapshot(MISSING, url=serve.url, api_key=serve.keys["alice"],
                                    audit_log="/tmp/x.jsonl")  # fmt: skip
    assert not serve.errors()


def test_fork_is_a_separate_running_sandbox(serve: Server, sb: RemoteSandbox) -> None:
    sb.files.write("/workspace/shared.txt", "before the fork")
    child = sb.fork()
    try:
        assert isinstance(child, RemoteSandbox)
        assert child.id != sb.id and child.state == "running"
        assert child.files.read_text("/workspace/shared.txt") == "before the fork"
        child.files.write("/workspace/child.txt", "only in the child")
        assert not sb.files.exists("/workspace/child.txt")
        sb.files.write("/workspace/parent.txt", "only in the parent")
        assert not child.files.exists("/workspace/parent.txt")
        forked = [r for r in child.audit() if r["event"] == "sandbox.forked"]
        assert forked, [r["event"] for r in child.audit()]
        # destroying the child leaves the parent (and its HTTP client) alone
        assert child.destroy().clean
        assert child.state == "destroyed"
        assert sb.run(["cat", "shared.txt"]).stdout == "before the fork"
    finally:
        child.destroy()
    many = sb.forks(2)
    try:
        assert len({c.id for c in many} | {sb.id}) == 3
        for c in many:
            assert c.files.read_text("/workspace/parent.txt") == "only in the parent"
    finally:
        for c in many:
            c.destroy()
    assert not serve.errors()


def test_a_paused_sandbox_cannot_be_snapshotted_or_forked(serve: Server, sb: RemoteSandbox) -> None:
    sb.pause()
    for call in (sb.snapshot, sb.fork):
        with pytest.raises(SnapshotError) as ei:
            call()
        assert ei.value.rule == "snapshot.state", call
    sb.resume()
    assert not serve.errors()


def test_tenants_never_reach_each_others_snapshots(serve: Server, sb: RemoteSandbox) -> None:
    info = sb.snapshot(name="alice-only")
    bob = {"url": serve.url, "api_key": serve.keys["bob"]}
    try:
        assert info.id not in {i.id for i in RemoteSandbox.list_snapshots(**bob)}
        assert RemoteSandbox.list_snapshots(**bob, name="alice-only") == []
        with pytest.raises(SnapshotError) as ei:
            RemoteSandbox.get_snapshot(info.id, **bob)
        assert ei.value.rule == "snapshot.not_found"
        with pytest.raises(SnapshotError) as ei:
            RemoteSandbox.from_snapshot(info.id, **bob)
        assert ei.value.rule == "snapshot.not_found"
        assert RemoteSandbox.delete_snapshot(info.id, **bob) is False
        # still alice's, untouched
        assert RemoteSandbox.get_snapshot(info.id, **_alice(serve)).id == info.id
    finally:
        _cleanup(serve, info.id)
    assert not serve.errors()


def test_a_destroyed_sandbox_refuses_every_snapshot_call(serve: Server) -> None:
    box = Sandbox(url=serve.url, api_key=serve.keys["alice"])
    assert isinstance(box, RemoteSandbox)
    box.destroy()
    assert box.state == "destroyed"
    for call in (box.pause, box.resume, box.snapshot, box.fork):
        with pytest.raises(SandboxClosed):
            call()


def test_snapshot_calls_need_a_url_and_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLASSROOM_API_KEY", raising=False)
    with pytest.raises(SandboxError, match="url= and api_key="):
        RemoteSandbox.list_snapshots(url="http://127.0.0.1:9")
    with pytest.raises(SandboxError, match="url= and api_key="):
        RemoteSandbox.from_snapshot(MISSING, api_key="k")
