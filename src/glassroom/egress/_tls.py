"""TLS pieces: a per-sandbox CA, leaf certificates, and ClientHello SNI parsing.

The CA's private key lives only in the supervisor's memory: it is never
written to disk, so destroying the sandbox (dropping the object) destroys
the CA.  Only its certificate is written, into the sandbox's egress dir, as
``ca.pem`` and as ``ca-bundle.pem`` (the host's trust roots plus this CA, so
uninspected TLS still verifies against the real roots).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import ssl
import tempfile
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


class SandboxCA:
    """A short-lived CA for one sandbox; issues leaf certs per host on demand."""

    def __init__(self, sandbox_id: str, lifetime_s: float = 86400.0) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self._not_after = now + datetime.timedelta(seconds=lifetime_s + 3600)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"glassroom {sandbox_id} CA")])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )  # fmt: skip
            .sign(self._key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._lock = threading.Lock()

    def write(self, directory: str) -> None:
        """``ca.pem`` and ``ca-bundle.pem`` (host roots + this CA) in ``directory``."""
        roots = b""
        try:
            with open(SYSTEM_BUNDLE, "rb") as f:
                roots = f.read()
        except OSError:
            pass
        for name, data in (("ca.pem", self.pem), ("ca-bundle.pem", roots + b"\n" + self.pem)):
            path = os.path.join(directory, name)
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o644)

    def server_context(self, host: str) -> ssl.SSLContext:
        """A server-side context presenting a leaf cert for ``host`` signed by this CA."""
        with self._lock:
            ctx = self._contexts.get(host)
            if ctx is None:
                ctx = self._contexts[host] = self._make_context(host)
            return ctx

    def _make_context(self, host: str) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(self._not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        # load_cert_chain only reads files: a private temp dir, removed at once.
        with tempfile.TemporaryDirectory(prefix="glassroom-leaf-") as tmp:
            cpath, kpath = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
            with open(cpath, "wb") as f:
                f.write(cert.public_bytes(serialization.Encoding.PEM) + self.pem)
            fd = os.open(kpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(
                    key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                )
            ctx.load_cert_chain(cpath, kpath)
        return ctx


# -- ClientHello ---------------------------------------------------------------


class NotTLS(Exception):
    """The first bytes of a tunnel are not a TLS ClientHello."""


def client_hello_length(data: bytes) -> int | None:
    """Bytes needed for the whole first handshake message, or None if not known yet."""
    if len(data) < 5:
        return None
    if data[0] != 0x16 or data[1] != 0x03:
        raise NotTLS("not a TLS handshake record")
    if len(data) < 9:
        return None
    if data[5] != 0x01:
        raise NotTLS("the first handshake message is not a ClientHello")
    body = int.from_bytes(data[6:9], "big")
    if body > 1 << 16:
        raise NotTLS("ClientHello too large")
    # A ClientHello may span records; count record headers as we go.  Its
    # records must hold exactly the ClientHello: bytes after it inside the
    # last of them would reach the server unchecked.
    need, pos, got = body + 4, 0, 0
    while got < need:
        if pos + 5 > len(data):
            return None
        if data[pos] != 0x16:
            raise NotTLS("ClientHello interrupted by another record type")
        _check_header(data[pos : pos + 5])
        rlen = int.from_bytes(data[pos + 3 : pos + 5], "big")
        got += rlen
        pos += 5 + rlen
    if got != need:
        raise NotTLS("the ClientHello's records carry more than the ClientHello")
    return pos


#: TLS record content types a tunnel may carry: change_cipher_spec, alert,
#: handshake, application_data.  Heartbeat (24) and anything else is refused.
RECORD_TYPES = frozenset({20, 21, 22, 23})
#: Largest TLSCiphertext fragment (RFC 5246 6.2.3: 2^14 + 2048).
MAX_RECORD = (1 << 14) + 2048


def _check_header(head: bytes) -> None:
    ctype, major, minor = head[0], head[1], head[2]
    length = int.from_bytes(head[3:5], "big")
    if ctype not in RECORD_TYPES:
        raise NotTLS(f"record type {ctype} is not TLS")
    if major != 3 or not 1 <= minor <= 4:
        raise NotTLS(f"record version {major}.{minor} is not TLS 1.0-1.3")
    if length > MAX_RECORD:
        raise NotTLS(f"record of {length} bytes is longer than TLS allows")
    if length == 0 and ctype != 23:
        raise NotTLS("empty record that is not application data")


class RecordChecker:
    """Checks that one direction of a tunnel is a sequence of TLS records.

    Why: checking only the ClientHello would let a client send a valid hello
    followed by any other protocol, spliced straight through.  ``feed``
    returns the bytes that may be forwarded: payload of records whose header
    was checked; an incomplete header is held back until it is complete, so
    not one byte of a bad record goes out.  It checks framing only: what is
    inside application data records is opaque (see docs/network.md).
    """

    def __init__(self, *, first_types: frozenset[int] = RECORD_TYPES) -> None:
        self._head = b""
        self._left = 0  # payload bytes of the current record still to pass
        self._first: frozenset[int] | None = first_types

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        i, n = 0, len(data)
        while i < n:
            if self._left:
                take = min(self._left, n - i)
                out += data[i : i + take]
                i += take
                self._left -= take
                continue
            take = min(5 - len(self._head), n - i)
            self._head += data[i : i + take]
            i += take
            if len(self._head) < 5:
                break
            _check_header(self._head)
            if self._first is not None and self._head[0] not in self._first:
                raise NotTLS(f"the first record (type {self._head[0]}) is not a handshake")
            self._first = None
            out += self._head
            self._left = int.from_bytes(self._head[3:5], "big")
            self._head = b""
        return bytes(out)


def parse_sni(data: bytes) -> str | None:
    """The server_name of a complete ClientHello (records already complete), or None.

    The message is walked field by field and must end exactly where its
    length says: a "ClientHello" that is a valid header over other bytes is
    not TLS.
    """
    hs = bytearray()
    pos = 0
    while pos + 5 <= len(data):
        rlen = int.from_bytes(data[pos + 3 : pos + 5], "big")
        hs += data[pos + 5 : pos + 5 + rlen]
        pos += 5 + rlen
    try:
        end = 4 + int.from_bytes(hs[1:4], "big")
        if end != len(hs) or hs[4] != 3 or not 1 <= hs[5] <= 4:
            raise NotTLS("malformed ClientHello")
        p = 4 + 2 + 32  # handshake header, version, random
        if hs[p] > 32:
            raise NotTLS("malformed ClientHello (session id)")
        p += 1 + hs[p]  # session id
        suites = int.from_bytes(hs[p : p + 2], "big")
        if suites < 2 or suites % 2:
            raise NotTLS("malformed ClientHello (cipher suites)")
        p += 2 + suites
        if hs[p] < 1:
            raise NotTLS("malformed ClientHello (compression methods)")
        p += 1 + hs[p]
        if p == end:
            return None  # no extensions at all
        ext_end = p + 2 + int.from_bytes(hs[p : p + 2], "big")
        if ext_end != end:
            raise NotTLS("malformed ClientHello (extensions do not end the message)")
        p += 2
        sni: str | None = None
        while p < ext_end:
            etype = int.from_bytes(hs[p : p + 2], "big")
            elen = int.from_bytes(hs[p + 2 : p + 4], "big")
            if p + 4 + elen > ext_end:
                raise NotTLS("malformed ClientHello (an extension overruns)")
            if etype == 0:  # server_name
                q = p + 4 + 2
                while q + 3 <= p + 4 + elen:
                    ntype = hs[q]
                    nlen = int.from_bytes(hs[q + 1 : q + 3], "big")
                    if ntype == 0:
                        sni = bytes(hs[q + 3 : q + 3 + nlen]).decode("ascii").lower().rstrip(".")
                        break
                    q += 3 + nlen
            p += 4 + elen
        if p != ext_end:
            raise NotTLS("malformed ClientHello (extensions)")
    except (IndexError, UnicodeDecodeError):
        raise NotTLS("malformed ClientHello") from None
    return sni


# -- a TLS layer over asyncio streams, fed with bytes already read ---------------


class TLSStream:
    """TLS over an asyncio stream pair via MemoryBIO, so peeked bytes can be fed first."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ctx: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        initial: bytes = b"",
    ) -> None:
        self.reader, self.writer = reader, writer
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(
            self.inc, self.out, server_side=server_side, server_hostname=server_hostname
        )
        if initial:
            self.inc.write(initial)

    async def _flush(self) -> None:
        data = self.out.read()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def _fill(self) -> bool:
        data = await self.reader.read(1 << 16)
        if not data:
            self.inc.write_eof()
            return False
        self.inc.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                await self._flush()
                return
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionResetError("EOF during TLS handshake") from None

    async def read(self, n: int = 1 << 16) -> bytes:
        while True:
            try:
                return self.obj.read(n)
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    async def write(self, data: bytes) -> None:
        self.obj.write(data)
        await self._flush()

    def close(self) -> None:
        try:
            self.obj.unwrap()
        except ssl.SSLError:
            pass
        data = self.out.read()
        try:
            if data:
                self.writer.write(data)
            self.writer.close()
        except (OSError, RuntimeError):
            pass
