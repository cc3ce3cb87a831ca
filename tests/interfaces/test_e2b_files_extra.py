"""E2B file metadata, signed file URLs and sandbox metrics, with the unmodified
``e2b`` SDK against a real ``glassroom serve``.

Each feature in pairs: what the SDK does works, and the forged or malformed
variant is refused with the exact error.  Metadata is stored as
``user.e2b.*`` xattrs by a helper run in the sandbox, which the audit log
records like any command."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest

from .serve_helpers import Server

e2b = pytest.importorskip("e2b")
httpx = pytest.importorskip("httpx")
from e2b import InvalidArgumentException  # noqa: E402

from glassroom.audit import read_records  # noqa: E402
from glassroom.interfaces.e2b import _signing  # noqa: E402


def _fetch(url: str, data: bytes | None = None, ctype: str = "") -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if ctype:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _with(url: str, **changes: str) -> str:
    """``url`` with some query parameters replaced."""
    parts = urllib.parse.urlsplit(url)
    q = dict(urllib.parse.parse_qsl(parts.query))
    q.update(changes)
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(q)))


# -- signed URLs -------------------------------------------------------------------


def test_signed_download_works_and_forgeries_are_refused(serve: Server, sbx: Any) -> None:
    sbx.files.write("signed.txt", "hello signed")
    sbx.files.write("other.txt", "not for you")
    url = sbx.download_url("signed.txt", "user", 60)
    assert "X-Access-Token" not in url and "signature=v1_" in url
    assert _fetch(url) == (200, b"hello signed")

    # the same signature for another path, another user, or as a write: refused
    refused = (401, json.dumps({"code": 401, "message": "invalid signature"}).encode())
    for forged in (
        _with(url, path="other.txt"),
        _with(url, path="/etc/passwd"),
        _with(url, username="root"),
        _with(url, signature_expiration=str(int(time.time()) + 86400)),
        _with(url, signature="v1_" + "A" * 43),
    ):
        status, body = _fetch(forged)
        assert (status, json.loads(body)) == (refused[0], json.loads(refused[1])), forged
    # a signature made with a guessed token (the real one's format) is refused too
    guessed = _signing.sign("signed.txt", "read", "user", "x" * 32, None)
    assert _fetch(_with(url, signature=guessed, signature_expiration=""))[0] == 401


def test_signed_url_expired_is_refused(serve: Server, sbx: Any) -> None:
    sbx.files.write("soon.txt", "x")
    status, body = _fetch(sbx.download_url("soon.txt", "user", -5))
    assert status == 401
    assert json.loads(body) == {"code": 401, "message": "signature is already expired"}
    # a malformed expiration is a 400, not a crash
    status, _ = _fetch(_with(sbx.download_url("soon.txt", "user", 60), signature_expiration="x"))
    assert status == 400


def test_signed_upload_works_and_a_read_signature_cannot_write(serve: Server, sbx: Any) -> None:
    up = sbx.upload_url("uploaded.txt", "user", 60)
    boundary = "glassroomboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="uploaded.txt"\r\nContent-Type: application/octet-stream\r\n\r\n'
        f"via signed url\r\n--{boundary}--\r\n"
    ).encode()
    ctype = f"multipart/form-data; boundary={boundary}"
    status, _ = _fetch(up, body, ctype)
    assert status == 200
    assert sbx.files.read("uploaded.txt") == "via signed url"

    # a download (read) signature used to write: refused, nothing written
    read_url = sbx.download_url("planted.txt", "user", 60)
    status, reply = _fetch(read_url, body.replace(b"uploaded", b"planted"), ctype)
    assert status == 401 and json.loads(reply)["message"] == "invalid signature"
    assert not sbx.files.exists("planted.txt")


def test_signature_of_one_sandbox_does_not_open_another(serve: Server, sbx: Any) -> None:
    other = e2b.Sandbox.create(timeout=60)
    try:
        other.files.write("mine.txt", "other's")
        url = sbx.download_url("mine.txt", "user", 60)  # signed with sbx's token
        status, body = _fetch(url)  # it opens sbx, which has no such file: never other's
        assert status == 404 and b"other's" not in body
        # naming the other sandbox explicitly: the signature is not its token's
        req = urllib.request.Request(url, headers={"E2b-Sandbox-Id": other.sandbox_id})
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=30)
        assert exc.value.code == 401
    finally:
        other.kill()


# -- metadata ----------------------------------------------------------------------


def test_metadata_round_trip_and_audit(serve: Server, sbx: Any) -> None:
    info = sbx.files.write("m.txt", "content", metadata={"Author": "ann", "stage": "1"})
    assert info.metadata == {"author": "ann", "stage": "1"}  # keys lowercased
    assert sbx.files.get_info("m.txt").metadata == {"author": "ann", "stage": "1"}
    # set out of band in the sandbox: surfaced too
    sbx.commands.run(
        "python3 -c \"import os; os.setxattr('/home/user/m.txt', 'user.e2b.extra', b'x')\""
    )
    assert sbx.files.get_info("m.txt").metadata == {"author": "ann", "stage": "1", "extra": "x"}
    # the helper that stores it ran in the sandbox and is audited as a command
    recs = [r for r in read_records(serve.cfg.audit_log) if r.get("sandbox") == sbx.sandbox_id]
    started = [r for r in recs if r.get("event") == "command.started"]
    assert any(r["details"]["argv"][:2] == ["python3", "-I"] for r in started)


def test_metadata_bad_keys_and_values_are_refused(serve: Server, sbx: Any) -> None:
    # the SDK checks first ...
    with pytest.raises(InvalidArgumentException):
        sbx.files.write("bad.txt", "x", metadata={"bad key": "v"})
    # ... and the server checks what a raw client sends: 400, nothing written
    url = sbx.envd_api_url.rstrip("/") + "/files"
    head = {"E2b-Sandbox-Id": sbx.sandbox_id, "X-Access-Token": sbx._envd_access_token}
    for extra, want in (
        ({"X-Metadata-ok": "v" * 5000}, "at most 4096 characters"),
        ({f"X-Metadata-k{i}": "v" for i in range(65)}, "at most 64 keys"),
    ):
        r = httpx.post(
            url,
            params={"path": "bad.txt"},
            content=b"x",
            headers={**head, **extra, "Content-Type": "application/octet-stream"},
            timeout=30,
        )
        assert r.status_code == 400 and want in r.json()["message"], r.text
    assert not sbx.files.exists("bad.txt")


# -- metrics -----------------------------------------------------------------------


def test_metrics_are_real_and_only_the_owners(serve: Server, sbx: Any) -> None:
    sbx.commands.run("head -c 2000000 /dev/zero > /home/user/blob")
    metrics = sbx.get_metrics()
    assert metrics
    m = metrics[-1]
    res = serve.service.get(
        serve.service.authenticate(serve.keys["alice"]), sbx.sandbox_id
    ).sb.policy.resources
    assert m.cpu_count == max(1, int(res.cpus))
    assert m.mem_total == res.memory_mib << 20
    assert m.mem_used > 0
    assert m.disk_total > 0 and m.disk_used >= 2_000_000  # the blob is on the workspace
    assert 0 <= m.cpu_used_pct <= 100
    # a range before the sandbox existed: nothing
    assert sbx.get_metrics(start=_ago(7200), end=_ago(3600)) == []
    # another tenant cannot read them
    r = httpx.get(
        f"{serve.url}/sandboxes/{sbx.sandbox_id}/metrics", headers=serve.headers("bob"), timeout=30
    )
    assert r.status_code == 404
    r = httpx.get(
        f"{serve.url}/sandboxes/{sbx.sandbox_id}/metrics",
        params={"start": "yesterday"},
        headers=serve.headers(),
        timeout=30,
    )
    assert r.status_code == 400 and "start" in r.json()["message"]


def _ago(secs: int) -> Any:
    import datetime

    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=secs)
