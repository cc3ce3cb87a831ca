"""The syslog sink against a REAL receiver: rsyslogd on 127.0.0.1, UDP and TCP.

rsyslogd (Debian package ``rsyslog``; scripts/setup.sh installs it for the
tests) runs in the foreground with a private config: imudp and imtcp bound
to 127.0.0.1 on a free port, every message from app ``glassroom*`` written
with a raw template (``%inputname% %rawmsg%``) to a file in tmp.  Without
rsyslogd the receiver tests fail when ``CI=true`` and skip otherwise.

All traffic stays on 127.0.0.1; every wait is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from glassroom._errors import AuditError
from glassroom.audit import AuditLog, parse_sink_url
from glassroom.audit._sinks import format_syslog

LOOPBACK = "127.0.0.1"
WAIT_S = 10.0
RAW = re.compile(
    r"^(?P<input>\S+) <(?P<pri>\d+)>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<pid>\S+) "
    r"(?P<msgid>\S+) - (?P<msg>.*)$"
)


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLASSROOM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("GLASSROOM_AUDIT_SINKS", raising=False)
    monkeypatch.delenv("GLASSROOM_AUDIT_ANCHOR_KEY", raising=False)


def wait_until(check: Callable[[], Any], timeout: float = WAIT_S, step: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / step) + 1):
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(step)
    return check()


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (a bounded number of tries)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((LOOPBACK, 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((LOOPBACK, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both TCP and UDP on 127.0.0.1 after 50 tries")


def rsyslogd_binary() -> str:
    found = shutil.which("rsyslogd") or next(
        (p for p in ("/usr/sbin/rsyslogd", "/sbin/rsyslogd") if os.access(p, os.X_OK)), None
    )
    if found is None:
        message = (
            "rsyslogd not found: these tests need a real syslog receiver; install the "
            "Debian package rsyslog (apt-get install -y rsyslog; scripts/setup.sh does it "
            "with GLASSROOM_SETUP_TIERS=1)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


@dataclass
class Receiver:
    port: int
    out: Path

    def messages(self, app: str = "glassroom") -> list[dict[str, str]]:
        if not self.out.exists():
            return []
        found = []
        for line in self.out.read_text(errors="replace").splitlines():
            m = RAW.match(line)
            if m and m["app"] == app:
                found.append(m.groupdict())
        return found


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[Receiver]:
    binary = rsyslogd_binary()
    work = tmp_path / "rsyslog"
    work.mkdir()
    port = free_port()
    out = work / "received.log"
    conf = work / "rsyslog.conf"
    conf.write_text(
        f"""
global(workDirectory="{work}" maxMessageSize="128k")
module(load="imudp")
module(load="imtcp")
input(type="imudp" address="{LOOPBACK}" port="{port}")
input(type="imtcp" address="{LOOPBACK}" port="{port}")
template(name="raw" type="string" string="%inputname% %rawmsg%\\n")
if $app-name startswith "glassroom" then {{
  action(type="omfile" file="{out}" template="raw")
}}
stop
"""
    )
    log = open(work / "rsyslogd.out", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [binary, "-n", "-f", str(conf), "-i", str(work / "rsyslogd.pid")],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    receiver = Receiver(port, out)
    try:

        def tcp_ready() -> bool:
            if proc.poll() is not None:
                return True  # it exited: stop waiting, report below
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.5):
                return True
            return False

        wait_until(tcp_ready)
        if proc.poll() is not None:
            pytest.fail(f"rsyslogd exited: {(work / 'rsyslogd.out').read_text()[-2000:]}")
        # UDP has no handshake: probe until a datagram comes through (bounded).
        probe = format_syslog(b"probe", "probe", "info", "-", facility=1)
        probe = probe.replace(b" glassroom ", b" glassroom-probe ")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:

            def udp_ready() -> bool:
                udp.sendto(probe, (LOOPBACK, port))
                return bool(receiver.messages("glassroom-probe"))

            if not wait_until(udp_ready, step=0.2):
                pytest.fail(f"rsyslogd on udp {port} received nothing within {WAIT_S}s")
        yield receiver
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def append_sample(log: AuditLog) -> list[dict[str, Any]]:
    recs = [
        log.append("-", "sandbox.created", {"id": "sb-1"}, decision="allow"),
        log.append("sb-1", "command.started", {"argv": ["sh", "-c", "echo 'hi' \"there\"\n"]}),
        log.append("sb-1", "blocked", {"action": "read"}, decision="deny", rule="filesystem.read"),
        log.append("sb-1", "command.ended", {"exit_code": 0, "out": "é✓ \x1b[31m"}),
        log.append("sb-1", "big", {"blob": "x" * 40_000}),
    ]
    recs += log.append_many(
        "sb-1",
        [
            ("file.open", {"path": "/etc/passwd", "flags": "O_WRONLY", "result": "EROFS"},
             "deny", "filesystem.write"),
            ("exec", {"path": "/bin/ls", "argv": ["ls"], "result": "ok"}, "allow", None),
        ],
    )  # fmt: skip
    return recs


# --------------------------------------------------------------------------- a real receiver


def test_records_reach_rsyslog_over_udp_and_tcp(rsyslog: Receiver, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    urls = [f"syslog+udp://{LOOPBACK}:{rsyslog.port}", f"syslog+tcp://{LOOPBACK}:{rsyslog.port}"]
    with AuditLog(path, sinks=urls) as log:
        recs = append_sample(log)
    stats = log.sink_stats()
    assert [s.url for s in stats] == urls
    for s in stats:
        assert (s.sent, s.dropped, s.failed, s.pending) == (len(recs), 0, 0, 0), s

    def both_arrived() -> list[dict[str, str]] | None:
        msgs = rsyslog.messages()
        return msgs if len(msgs) >= 2 * len(recs) else None

    msgs = wait_until(both_arrived) or rsyslog.messages()
    assert len(msgs) == 2 * len(recs), msgs
    stored = path.read_bytes().splitlines()
    for transport in ("imudp", "imtcp"):
        got = [m for m in msgs if m["input"] == transport]
        by_seq = {json.loads(m["msg"])["seq"]: m for m in got}
        assert sorted(by_seq) == [r["seq"] for r in recs], transport
        for rec, line in zip(recs, stored, strict=True):
            m = by_seq[rec["seq"]]
            if transport == "imudp" and len(line) > 8000:
                # Too big for one datagram: a stub names it (seq, hash) and proves it.
                stub = json.loads(m["msg"])
                assert (stub["seq"], stub["hash"]) == (rec["seq"], rec["hash"])
                assert stub["_truncated"] == {
                    "bytes": len(line), "sha256": hashlib.sha256(line).hexdigest()}  # fmt: skip
                continue
            # the message is the record's canonical JSON: the file's line, byte for byte
            assert m["msg"].encode() == line
            assert json.loads(m["msg"]) == rec
            assert (json.loads(m["msg"])["seq"], json.loads(m["msg"])["hash"]) == (
                rec["seq"], rec["hash"])  # fmt: skip
            severity = 4 if rec["decision"] == "deny" else 6
            assert int(m["pri"]) == 13 * 8 + severity
            assert (m["app"], m["msgid"], m["ts"], m["pid"]) == (
                "glassroom", rec["event"], rec["ts"], str(os.getpid()))  # fmt: skip


def test_sinks_from_the_environment(
    rsyslog: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"syslog+tcp://{LOOPBACK}:{rsyslog.port}?facility=local3"
    monkeypatch.setenv("GLASSROOM_AUDIT_SINKS", f" {url} ,")
    with AuditLog(tmp_path / "audit.jsonl", fsync=False) as log:
        rec = log.append("sb-env", "anomaly", {"n": 1}, decision="deny", rule="x")
    assert [s.url for s in log.sink_stats()] == [url]
    msgs = wait_until(lambda: [m for m in rsyslog.messages() if m["msgid"] == "anomaly"])
    assert len(msgs) == 1
    assert int(msgs[0]["pri"]) == 19 * 8 + 4  # local3.warning
    assert json.loads(msgs[0]["msg"])["hash"] == rec["hash"]
    # an explicit empty list overrides the environment
    with AuditLog(tmp_path / "other.jsonl", fsync=False, sinks=[]) as log:
        assert log.sink_stats() == []


# --------------------------------------------------------------------------- never block the file


def test_slow_receiver_drops_and_counts_but_never_blocks_the_writer(tmp_path: Path) -> None:
    """A TCP peer that accepts nothing and reads nothing: the kernel buffers
    fill, the sender blocks, the queue (5) overflows; the file keeps every record."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind((LOOPBACK, 0))
        server.listen(1)
        port = server.getsockname()[1]
        path = tmp_path / "audit.jsonl"
        url = f"syslog+tcp://{LOOPBACK}:{port}?queue=5&timeout=1"
        n = 600  # ~36 MB: well past any loopback socket buffers
        slowest = 0.0
        log = AuditLog(path, fsync=False, sinks=[url])
        for i in range(n):
            t0 = time.monotonic()
            log.append("sb", "x", {"i": i, "blob": "y" * 60_000})
            slowest = max(slowest, time.monotonic() - t0)
        t0 = time.monotonic()
        log.close()
        closing = time.monotonic() - t0
    (stats,) = log.sink_stats()
    assert stats.dropped > 0, stats
    assert stats.sent + stats.dropped + stats.failed + stats.pending == n, stats
    assert stats.pending == 0
    assert slowest < 0.5, f"an append waited {slowest:.2f}s: the sink blocked the writer"
    assert closing < 8.0, f"close waited {closing:.1f}s"
    assert len(path.read_bytes().splitlines()) == n  # the file is complete regardless


def test_absent_receiver_counts_failures_and_close_is_bounded(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, fsync=False, sinks=[f"syslog+tcp://{LOOPBACK}:{port}?timeout=1"])
    for i in range(20):
        log.append("sb", "x", {"i": i})
    t0 = time.monotonic()
    log.close()
    assert time.monotonic() - t0 < 7.0
    (stats,) = log.sink_stats()
    assert (stats.sent, stats.dropped, stats.failed, stats.pending) == (0, 0, 20, 0), stats
    assert re.search(r"refused|not connected", stats.last_error or ""), stats
    assert len(path.read_bytes().splitlines()) == 20


# --------------------------------------------------------------------------- URLs and format


def test_good_sink_urls() -> None:
    c = parse_sink_url("syslog+udp://127.0.0.1:5514")
    assert (c.transport, c.host, c.port) == ("udp", "127.0.0.1", 5514)
    assert (c.facility, c.queue, c.timeout_s) == (13, 10_000, 5.0)
    c = parse_sink_url("SYSLOG+TCP://[::1]:6514/?facility=local7&queue=50&timeout=2.5")
    assert (c.transport, c.host, c.port, c.facility, c.queue, c.timeout_s) == (
        "tcp", "::1", 6514, 23, 50, 2.5)  # fmt: skip
    assert parse_sink_url("syslog+tcp://logs.example").port == 514
    assert parse_sink_url("syslog+udp://h:1?facility=4").facility == 4


@pytest.mark.parametrize(
    ("url", "what"),
    [
        ("", "empty sink URL"),
        ("syslog://127.0.0.1:514", "unknown scheme 'syslog'; expected syslog+udp://"),
        ("http://127.0.0.1:514", "unknown scheme 'http'"),
        ("127.0.0.1:514", "unknown scheme"),
        ("syslog+udp://:514", "no host"),
        ("syslog+udp://127.0.0.1:notaport", "the port must be a number 1-65535"),
        ("syslog+udp://127.0.0.1:70000", "the port must be a number 1-65535"),
        ("syslog+tcp://127.0.0.1:0", "port 0"),
        ("syslog+tcp://u:p@127.0.0.1:514", "user/password are not supported"),
        ("syslog+tcp://127.0.0.1:514/path", "unexpected path '/path'"),
        ("syslog+tcp://127.0.0.1:514#frag", "unexpected fragment"),
        ("syslog+tcp://127.0.0.1:514?facility=nope", "facility 'nope' is not 0-23"),
        ("syslog+tcp://127.0.0.1:514?facility=24", "facility '24' is not 0-23"),
        ("syslog+tcp://127.0.0.1:514?queue=0", "queue '0' is not a number"),
        ("syslog+tcp://127.0.0.1:514?timeout=-1", "timeout '-1' is not a number of seconds"),
        ("syslog+tcp://127.0.0.1:514?timeout=nan", "timeout 'nan'"),
        ("syslog+tcp://127.0.0.1:514?tls=1", "unknown option 'tls'"),
    ],
)
def test_malformed_sink_url_is_a_clear_error(url: str, what: str, tmp_path: Path) -> None:
    with pytest.raises(AuditError, match=re.escape(what)) as info:
        parse_sink_url(url)
    assert f"audit sink {url!r}" in str(info.value)
    # through AuditLog and through the environment too, before any file is opened
    with pytest.raises(AuditError, match=re.escape(what)):
        AuditLog(tmp_path / "a.jsonl", sinks=["syslog+udp://127.0.0.1:5514", url])
    os.environ["GLASSROOM_AUDIT_SINKS"] = url or ","
    try:
        if url:
            with pytest.raises(AuditError, match=re.escape(what)):
                AuditLog(tmp_path / "a.jsonl")
    finally:
        del os.environ["GLASSROOM_AUDIT_SINKS"]
    assert not (tmp_path / "a.jsonl").exists()


def test_format_syslog_header() -> None:
    msg = format_syslog(b'{"a":1}', "file.open", "deny", "2026-11-27T02:40:00.123456Z",
                        hostname="host", procid=42)  # fmt: skip
    assert msg == b'<108>1 2026-11-27T02:40:00.123456Z host glassroom 42 file.open - {"a":1}'
    msg = format_syslog(b"{}", "a very long event name with spaces" * 2, "info", "t", procid=1)
    assert msg.split(b" ")[5] == b"a_very_long_event_name_with_spac"  # 32 printable chars
    assert msg.startswith(b"<110>1 t - glassroom 1 ")
