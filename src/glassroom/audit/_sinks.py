"""Forwarding audit records to an external receiver: RFC 5424 syslog over UDP or TCP.

Why forward at all: the JSONL file lives on the supervisor's host.  A copy at
a collector elsewhere survives the host (and shows *what* was there when the
anchor only proves *that* something changed).

Why a bounded queue and a background thread per sink: the file is the source
of truth and must never wait for, or fail because of, a slow or dead
receiver.  :meth:`SyslogSink.submit` only appends to an in-memory queue
(O(1), never raises, never blocks on the network); a daemon thread formats
and sends.  When the queue is full the record is dropped *and counted*, and
:meth:`SyslogSink.stats` shows the counts, so a gap at the receiver is
explained.  Delivery is best effort, at most once: syslog has no
acknowledgements (a TCP send into a connection the peer already closed can
vanish), so compare against the file when it matters.

Wire format (RFC 5424)::

    <PRI>1 TIMESTAMP HOSTNAME glassroom PROCID MSGID - MSG

PRI = facility * 8 + severity; facility 13 ("log audit", RFC 5424 table 1)
unless the URL says otherwise; severity 4 (warning) for ``deny`` records and
6 (informational) for the rest.  TIMESTAMP is the record's ``ts``, MSGID its
``event`` (cut to the 32 printable ASCII characters RFC 5424 allows), MSG
the record's canonical JSON line, byte for byte as in the file (pure ASCII,
so no BOM).  Over TCP each message is framed by octet counting (RFC 6587
3.4.1: ``LEN SP MSG``), so a newline inside a message cannot split it.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from .._errors import AuditError

SCHEMES = {"syslog+udp": "udp", "syslog+tcp": "tcp"}
DEFAULT_PORT = 514
DEFAULT_QUEUE = 10_000
MAX_QUEUE = 1_000_000
DEFAULT_TIMEOUT_S = 5.0
MAX_TIMEOUT_S = 60.0
CLOSE_TIMEOUT_S = 5.0
"""How long :meth:`AuditLog.close` waits, in total, for sinks to send what is queued."""

APP_NAME = "glassroom"
FACILITY_LOG_AUDIT = 13
SEVERITY_WARNING = 4
SEVERITY_INFO = 6
FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
    "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12,
    "audit": 13, "security": 13, "alert": 14, "clock": 15,
    **{f"local{i}": 16 + i for i in range(8)},
}  # fmt: skip
_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 30.0


@dataclass(frozen=True)
class SinkConfig:
    """A parsed sink URL."""

    url: str
    transport: str  # "udp" | "tcp"
    host: str
    port: int
    facility: int = FACILITY_LOG_AUDIT
    queue: int = DEFAULT_QUEUE
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class SinkStats:
    """What one sink did: ``sent`` + ``dropped`` + ``failed`` + ``pending`` = submitted.

    ``dropped``: the queue was full (the receiver or the network was too slow);
    ``failed``: sending raised, or the record was still queued when
    :meth:`SyslogSink.close` gave up waiting; ``last_error`` says why.
    """

    url: str
    sent: int
    dropped: int
    failed: int
    pending: int
    last_error: str | None


def _bad(url: str, what: str) -> AuditError:
    return AuditError(f"audit sink {url!r}: {what}")


def parse_sink_url(url: str) -> SinkConfig:
    """Parse ``syslog+udp://HOST[:PORT][?facility=..&queue=..&timeout=..]`` (or ``+tcp``).

    Every mistake is an :class:`AuditError` that names the URL and the part
    that is wrong, so a typo in ``GLASSROOM_AUDIT_SINKS`` stops the supervisor
    at start instead of silently sending nothing.
    """
    if not isinstance(url, str) or not url.strip():
        raise _bad(str(url), "empty sink URL")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise _bad(url, f"malformed URL ({exc}); the port must be a number 1-65535") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise _bad(
            url,
            f"unknown scheme {parts.scheme!r}; expected syslog+udp://HOST:PORT "
            "or syslog+tcp://HOST:PORT",
        )
    if parts.username is not None or parts.password is not None:
        raise _bad(url, "user/password are not supported in a syslog sink URL")
    host = parts.hostname
    if not host:
        raise _bad(url, "no host (expected syslog+udp://HOST:PORT)")
    if port == 0:
        raise _bad(url, "port 0 is not a port to send to")
    if parts.path not in ("", "/"):
        raise _bad(url, f"unexpected path {parts.path!r}")
    if parts.fragment:
        raise _bad(url, f"unexpected fragment {parts.fragment!r}")
    facility, queue, timeout = FACILITY_LOG_AUDIT, DEFAULT_QUEUE, DEFAULT_TIMEOUT_S
    try:
        options = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise _bad(url, f"malformed query ({exc})") from None
    for key, value in options:
        if key == "facility":
            if value.isdigit() and 0 <= int(value) <= 23:
                facility = int(value)
            elif value.lower() in FACILITIES:
                facility = FACILITIES[value.lower()]
            else:
                raise _bad(url, f"facility {value!r} is not 0-23 or a name like local0, audit")
        elif key == "queue":
            if not value.isdigit() or not 1 <= int(value) <= MAX_QUEUE:
                raise _bad(url, f"queue {value!r} is not a number 1-{MAX_QUEUE}")
            queue = int(value)
        elif key == "timeout":
            try:
                timeout = float(value)
            except ValueError:
                timeout = math.nan
            if not 0 < timeout <= MAX_TIMEOUT_S:
                raise _bad(url, f"timeout {value!r} is not a number of seconds in (0, 60]")
        else:
            raise _bad(url, f"unknown option {key!r} (known: facility, queue, timeout)")
    return SinkConfig(
        url=url.strip(),
        transport=SCHEMES[scheme],
        host=host,
        port=port if port is not None else DEFAULT_PORT,
        facility=facility,
        queue=queue,
        timeout_s=timeout,
    )


def _printable(text: str, limit: int) -> str:
    """RFC 5424 header fields are PRINTUSASCII (33-126); anything else becomes ``_``."""
    clean = "".join(ch if 33 <= ord(ch) <= 126 else "_" for ch in text[:limit])
    return clean or "-"


def _hostname() -> str:
    try:
        return _printable(socket.gethostname(), 255)
    except OSError:
        return "-"


def format_syslog(
    line: bytes,
    event: str,
    decision: str,
    ts: str,
    *,
    facility: int = FACILITY_LOG_AUDIT,
    hostname: str = "-",
    procid: int | None = None,
) -> bytes:
    """One RFC 5424 message whose MSG is ``line`` (a record's canonical JSON, no newline)."""
    severity = SEVERITY_WARNING if decision == "deny" else SEVERITY_INFO
    pid = os.getpid() if procid is None else procid
    header = (
        f"<{facility * 8 + severity}>1 {_printable(ts, 64)} {hostname} {APP_NAME} "
        f"{pid} {_printable(event, 32)} - "
    )
    return header.encode("ascii") + line


_Item = tuple[bytes, str, str, str]

#: Larger datagrams are cut by most receivers (and over 65,507 bytes cannot
#: be sent at all): a sandbox must not make its own records undeliverable
#: with one huge argv.  A larger record goes as a stub that names it.
MAX_UDP_MESSAGE = 8192


def _udp_stub(line: bytes) -> bytes:
    """The record's identity without its details: seq and hash find the full
    record in the JSONL file, and the sha256 of the line proves the match."""
    try:
        rec = json.loads(line)
    except ValueError:
        rec = {}
    if not isinstance(rec, dict):
        rec = {}
    keep = {k: rec.get(k) for k in ("seq", "ts", "sandbox", "event", "decision", "rule", "hash")}
    keep["_truncated"] = {"bytes": len(line), "sha256": hashlib.sha256(line).hexdigest()}
    return json.dumps(keep, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class SyslogSink:
    """One syslog receiver: a bounded queue drained by a daemon thread."""

    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self._hostname = _hostname()
        self._cond = threading.Condition()
        self._items: collections.deque[_Item] = collections.deque()
        self._inflight = 0
        self._closing = False
        self._abandoned = False
        self._sent = 0
        self._dropped = 0
        self._failed = 0
        self._last_error: str | None = None
        self._sock: socket.socket | None = None
        self._addr: tuple[int, tuple[object, ...]] | None = None  # (family, sockaddr)
        self._retry_at = 0.0
        self._backoff = _BACKOFF_MIN_S
        self._thread = threading.Thread(
            target=self._run, name=f"glassroom-audit-sink {config.url}", daemon=True
        )
        self._thread.start()

    # -- the writer's side: never blocks, never raises ------------------------

    def submit(self, line: bytes, event: str, decision: str, ts: str) -> None:
        """Queue one record for sending; drop and count it if the queue is full."""
        with self._cond:
            if self._closing or len(self._items) >= self.config.queue:
                self._dropped += 1
                return
            self._items.append((line, event, decision, ts))
            self._cond.notify()

    def stats(self) -> SinkStats:
        with self._cond:
            return SinkStats(
                url=self.config.url,
                sent=self._sent,
                dropped=self._dropped,
                failed=self._failed,
                pending=len(self._items) + self._inflight,
                last_error=self._last_error,
            )

    def begin_close(self) -> None:
        """Stop accepting records; the thread sends what is queued, then exits."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def finish_close(self, deadline: float) -> None:
        """Wait until ``deadline`` (``time.monotonic()``) at most; count what is left as failed."""
        self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            if self._thread.is_alive():
                left = len(self._items) + self._inflight
                self._items.clear()
                self._abandoned = True
                if left:
                    self._failed += left
                    self._last_error = f"{left} record(s) still unsent when the log was closed"
                return
        self._disconnect()

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        self.begin_close()
        self.finish_close(time.monotonic() + timeout)

    # -- the thread's side -----------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closing:
                    self._cond.wait()
                if not self._items or self._abandoned:
                    break
                item = self._items.popleft()
                self._inflight = 1
            error = self._send(item)
            with self._cond:
                self._inflight = 0
                if self._abandoned:  # already counted as failed by finish_close
                    break
                if error is None:
                    self._sent += 1
                else:
                    self._failed += 1
                    self._last_error = error
        if self._abandoned:
            self._disconnect()

    def _send(self, item: _Item) -> str | None:
        """Send one record; return why it failed, or ``None``."""
        line, event, decision, ts = item
        message = format_syslog(
            line, event, decision, ts, facility=self.config.facility, hostname=self._hostname
        )
        try:
            if self.config.transport == "udp":
                if len(message) > MAX_UDP_MESSAGE:
                    message = format_syslog(
                        _udp_stub(line), event, decision, ts,
                        facility=self.config.facility, hostname=self._hostname,
                    )  # fmt: skip
                self._send_udp(message)
            else:
                self._send_tcp(b"%d " % len(message) + message)
        except OSError as exc:
            self._disconnect()
            return f"{type(exc).__name__}: {exc}"
        return None

    def _resolve(self, kind: socket.SocketKind) -> tuple[int, tuple[object, ...]]:
        if self._addr is None:
            infos = socket.getaddrinfo(self.config.host, self.config.port, type=kind)
            if not infos:
                raise OSError(f"cannot resolve {self.config.host}")
            family, _, _, _, sockaddr = infos[0]
            self._addr = (family, tuple(sockaddr))
        return self._addr

    def _send_udp(self, message: bytes) -> None:
        family, addr = self._resolve(socket.SOCK_DGRAM)
        if self._sock is None:
            self._sock = socket.socket(family, socket.SOCK_DGRAM)
            self._sock.settimeout(self.config.timeout_s)
        self._sock.sendto(message, addr)

    def _send_tcp(self, frame: bytes) -> None:
        if self._sock is None:
            now = time.monotonic()
            if now < self._retry_at:
                # Do not make every queued record wait out a connect timeout
                # while the receiver is down: fail fast until the backoff ends.
                raise OSError(f"not connected (retrying in {self._retry_at - now:.1f}s)")
            family, addr = self._resolve(socket.SOCK_STREAM)
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(self.config.timeout_s)
            try:
                sock.connect(addr)
            except OSError:
                sock.close()
                self._addr = None  # resolve again next time
                self._retry_at = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, _BACKOFF_MAX_S)
                raise
            self._sock = sock
            self._backoff = _BACKOFF_MIN_S
        self._sock.sendall(frame)

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def __repr__(self) -> str:
        return f"SyslogSink({self.config.url!r})"


def open_sinks(urls: list[str]) -> list[SyslogSink]:
    """Parse every URL first (so one bad URL starts no thread), then start the sinks."""
    configs = [parse_sink_url(url) for url in urls]
    return [SyslogSink(config) for config in configs]


def close_sinks(sinks: list[SyslogSink], timeout: float = CLOSE_TIMEOUT_S) -> None:
    """Close all sinks, waiting at most ``timeout`` seconds in total (not per sink)."""
    deadline = time.monotonic() + timeout
    for sink in sinks:
        sink.begin_close()
    for sink in sinks:
        sink.finish_close(deadline)
