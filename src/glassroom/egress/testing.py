"""Loopback servers and a test CA for the drill, the tests and the benchmark.

Everything here listens on 127.0.0.1 only.  ``LoopbackServer`` answers
``GET /anything`` with ``ok <method> <path>``, ``GET /bytes/N`` with N bytes,
``GET /slow/S`` after S seconds, and ``POST`` with the length of the body.
``GET /echo`` (and ``HEAD``) answers with the request's headers, in the body
and in ``x-echo-authorization``, as a hostile or careless API would; query
flags shape the answer: ``chunked=N`` (chunks of N bytes), ``close=1`` (no
length, ends by closing), ``b64=1`` (body base64-encoded), ``gzip=1``
(gzip whatever the client asked for), ``reason=1`` (the Authorization header
as the status line's reason phrase); a ``Range`` header is honoured.
With ``tls=TestCA(...)`` it serves HTTPS with a certificate for its names,
and with ``host="::1"`` it listens on IPv6 loopback.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import http.server
import os
import socket
import socketserver
import ssl
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


class TestCA:
    """A throwaway CA (files in a temp dir) that issues one server certificate."""

    __test__ = False  # not a pytest class

    def __init__(self, names: Sequence[str]) -> None:
        self.dir = tempfile.mkdtemp(prefix="glassroom-testca-")
        os.chmod(self.dir, 0o755)
        now = datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "glassroom test CA")])
        ca = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256())
        )  # fmt: skip
        skey = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(name).public_key(skey.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .sign(key, hashes.SHA256())
        )  # fmt: skip
        self.ca_pem = ca.public_bytes(serialization.Encoding.PEM)
        self.ca_file = os.path.join(self.dir, "ca.pem")
        self.cert_file = os.path.join(self.dir, "server.pem")
        self.key_file = os.path.join(self.dir, "server.key")
        with open(self.ca_file, "wb") as f:
            f.write(self.ca_pem)
        os.chmod(self.ca_file, 0o644)
        with open(self.cert_file, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(self.key_file, "wb") as f:
            f.write(skey.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))  # fmt: skip

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def cleanup(self) -> None:
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.server.hits.append((self.command, self.path, self.headers.get("host", "")))
        self.server.seen_headers.append(dict(self.headers.items()))
        if self.path.startswith("/echo"):
            self._echo()
            return
        if self.path.startswith("/bytes/"):
            n = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("content-length", str(n))
            self.end_headers()
            chunk = b"x" * (1 << 20)
            while n > 0:
                self.wfile.write(chunk[: min(n, len(chunk))])
                n -= min(n, len(chunk))
            return
        if self.path.startswith("/slow/"):
            time.sleep(float(self.path.split("/")[2]))
        self._send(f"ok {self.command} {self.path}".encode())

    def do_POST(self) -> None:
        n = int(self.headers.get("content-length") or 0)
        data = self.rfile.read(n)
        self.server.hits.append((self.command, self.path, self.headers.get("host", "")))
        self._send(f"ok POST {self.path} {len(data)}".encode())

    do_PUT = do_POST
    do_DELETE = do_GET

    def do_HEAD(self) -> None:
        self.server.hits.append((self.command, self.path, self.headers.get("host", "")))
        self.server.seen_headers.append(dict(self.headers.items()))
        self._echo(head_only=True)

    def _echo(self, head_only: bool = False) -> None:
        q = parse_qs(urlsplit(self.path).query)
        body = "".join(f"{k}: {v}\n" for k, v in self.headers.items()).encode()
        if "b64" in q:
            body = base64.b64encode(body)
        status, rng = 200, self.headers.get("range", "")
        if rng.startswith("bytes=") and "-" in rng:
            first, _, last = rng[6:].partition("-")
            body = body[int(first or 0) : int(last) + 1 if last else None]
            status = 206
        if "gzip" in q:
            body = gzip.compress(body)
        auth = self.headers.get("authorization", "")
        self.send_response(status, auth if "reason" in q and auth else None)
        self.send_header("content-type", "text/plain")
        self.send_header("x-echo-authorization", self.headers.get("authorization", ""))
        if "gzip" in q:
            self.send_header("content-encoding", "gzip")
        size = int(q["chunked"][0]) if "chunked" in q else 0
        if size:
            self.send_header("transfer-encoding", "chunked")
        elif "close" in q:
            self.send_header("connection", "close")
            self.close_connection = True
        else:
            self.send_header("content-length", str(len(body)))
        self.end_headers()
        if head_only:
            return
        if not size:
            self.wfile.write(body)
            return
        for i in range(0, len(body), size):
            piece = body[i : i + size]
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    # HTTPServer.server_bind looks the address up with getfqdn: slow, useless here.
    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "localhost", self.server_address[1]
    hits: list[tuple[str, str, str]]
    seen_headers: list[dict[str, str]]


class _Server6(_Server):
    address_family = socket.AF_INET6


class LoopbackServer:
    """An HTTP(S) server on 127.0.0.1 in a thread; ``with`` stops it."""

    def __init__(self, tls: TestCA | None = None, host: str = "127.0.0.1") -> None:
        if host not in ("127.0.0.1", "::1"):
            raise ValueError("a LoopbackServer listens on 127.0.0.1 or ::1 only")
        cls = _Server6 if host == "::1" else _Server
        self.httpd = cls((host, 0), _Handler)
        self.httpd.hits = []
        self.httpd.seen_headers = []
        if tls is not None:
            self.httpd.socket = tls.server_context().wrap_socket(
                self.httpd.socket, server_side=True
            )
        self.port: int = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def hits(self) -> list[tuple[str, str, str]]:
        return self.httpd.hits

    @property
    def seen_headers(self) -> list[dict[str, str]]:
        """Every request's headers, as the server received them."""
        return self.httpd.seen_headers

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RawRecorder:
    """A raw TCP server on 127.0.0.1: keeps the bytes of each connection (``conns``),
    and answers ``answer`` once, if given, after the first bytes.  One
    connection at a time, each for at most 5 s."""

    def __init__(self, answer: bytes = b"") -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.conns: list[bytearray] = []
        self.answer = answer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(0.2)
            got = bytearray()
            self.conns.append(got)
            deadline = time.monotonic() + 5
            answered = False
            while time.monotonic() < deadline and not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                got += data
                if self.answer and not answered:
                    conn.sendall(self.answer)
                    answered = True
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3)
        self.sock.close()

    def __enter__(self) -> RawRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
