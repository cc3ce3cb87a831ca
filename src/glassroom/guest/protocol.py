"""The microVM control channel's framing, shared by host and guest.

A frame is ``>II`` (header length, payload length), a JSON object (the
header) and an opaque payload (output, file data).  Both lengths are
bounded *before* anything is read, so a peer cannot make the reader
allocate more than :data:`MAX_HEADER` + :data:`MAX_PAYLOAD` bytes.

Stdlib only, and no glassroom import: this file is copied into the guest.
"""

import json
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

PREFIX = struct.Struct(">II")
MAX_HEADER = 64 * 1024
MAX_PAYLOAD = 256 * 1024
#: Output and file data travel in chunks of at most this many bytes.
CHUNK = 64 * 1024
#: Bumped whenever the wire format changes: host and guest must agree.
#: 2: ``trace`` frames (the file audit), ``audit`` in config/configured.
#: 3: ``quiesce``/``quiesced`` and ``resume``/``resumed`` (microVM checkpoints).
VERSION = 3


class FrameError(Exception):
    """The peer sent bytes that are not a valid frame."""


def encode(header: "dict[str, Any]", payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER or len(payload) > MAX_PAYLOAD:
        raise FrameError(f"frame too large ({len(head)}+{len(payload)} bytes)")
    return PREFIX.pack(len(head), len(payload)) + head + payload


def encode_raw(head: bytes, payload: bytes = b"") -> bytes:
    """:func:`encode` for a header that is already JSON (the guest's trace batches)."""
    if len(head) > MAX_HEADER or len(payload) > MAX_PAYLOAD:
        raise FrameError(f"frame too large ({len(head)}+{len(payload)} bytes)")
    return PREFIX.pack(len(head), len(payload)) + head + payload


class Decoder:
    """Incremental decoder: ``feed(bytes)`` returns the complete frames so far.

    Raises :class:`FrameError` on an oversized length or a header that is not
    a JSON object; the stream cannot be resynchronized after that.
    """

    def __init__(self, max_header: int = MAX_HEADER, max_payload: int = MAX_PAYLOAD) -> None:
        self.buf = bytearray()
        self.max_header = max_header
        self.max_payload = max_payload

    def feed(self, data: bytes) -> "list[tuple[dict[str, Any], bytes]]":
        self.buf += data
        out = []
        while len(self.buf) >= PREFIX.size:
            hlen, plen = PREFIX.unpack_from(self.buf)
            if hlen > self.max_header or plen > self.max_payload:
                raise FrameError(f"frame lengths {hlen}+{plen} exceed the bounds")
            total = PREFIX.size + hlen + plen
            if len(self.buf) < total:
                break
            raw = bytes(self.buf[PREFIX.size : PREFIX.size + hlen])
            payload = bytes(self.buf[PREFIX.size + hlen : total])
            del self.buf[:total]
            try:
                header = json.loads(raw)
            except (ValueError, RecursionError) as exc:  # RecursionError: deep nesting
                raise FrameError(f"malformed header: {exc}") from None
            if not isinstance(header, dict):
                raise FrameError("header is not a JSON object")
            out.append((header, payload))
        return out
