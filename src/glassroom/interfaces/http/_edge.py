"""The edge of ``glassroom serve``: what every request body passes before a handler.

Bad input must get a clear 4xx in the envelope its client can parse, and must
never reach the code behind it half-checked.  So one ASGI middleware
(:class:`Edge`), outside every route, does the checks that do not depend on
the route's meaning:

* **Size.**  At most ``max_request_bytes`` of body, counted *after* decoding:
  a ``Content-Encoding: gzip`` (or ``deflate``) body is inflated in bounded
  steps and refused (413) the moment it passes the limit, so a gzip bomb
  costs at most the limit.  A body that is not what its encoding says is 400;
  an encoding we do not speak is 415.
* **JSON, strictly.**  Python's ``json`` accepts ``NaN``, ``Infinity``,
  integers of any length, lone UTF-16 surrogates (``"\\ud800"``) and nesting
  until ``RecursionError``.  Each of those reached a handler before and broke
  something later (a sandbox with no deadline, a listing that cannot be
  encoded).  :func:`strict_json` refuses them with a message naming where.
  The parsed value is kept in the scope, so the E2B handlers do not parse twice
  (:func:`read_json`).
* **One error envelope per API family** (:func:`error_response`); the
  exception handlers of the app use the same function, so 404/405/422 and
  Starlette's own errors look like every other error of that family:

  ======================  ==========================================================
  own API (``/v1``)        ``{"error": {"code", "message", "rule"}}``
  E2B control plane        ``{"code": <HTTP status>, "message"}``
  envd REST, interpreter   ``{"code": <HTTP status>, "message"}``
  envd Connect, unary      ``{"code": "invalid_argument", "message"}`` (Connect codes)
  envd Connect, streaming  HTTP 200, an end-of-stream message ``{"error": {code, message}}``
  ======================  ==========================================================

Large bodies are decoded and parsed on a worker thread, so one tenant's big
request never stalls the event loop that serves everyone else.
"""

from __future__ import annotations

import enum
import json
import math
import re
import struct
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio.to_thread

from ._port_target import SCOPE_PORT, target_of
from ._service import ApiError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: JSON deeper than this is refused: no request of any API nests more than a
#: handful of levels (a policy object is the deepest, at about five).
MAX_JSON_DEPTH = 64
#: Integers longer than this many digits are refused: nothing legitimate is
#: outside (u)int64, and a 4,300-digit integer costs the parser real CPU.
MAX_INT_DIGITS = 20
#: Bodies smaller than this are decoded and parsed inline; larger ones on a thread.
INLINE_BYTES = 64 * 1024
_ENCODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15}
_SCOPE_JSON = "glassroom.json"
_SCOPE_FAMILY = "glassroom.family"
_CONNECT_PATH = re.compile(r"^/[A-Za-z_][\w.]*\.[A-Za-z_]\w*/\w+$")
CONNECT_STREAMING = frozenset(
    {"process.Process/Start", "process.Process/Connect", "filesystem.Filesystem/WatchDir"}
)


class Family(enum.StrEnum):
    """The API families ``glassroom serve`` speaks, each with its error shape."""

    OWN = "own"
    CONTROL = "e2b"
    ENVD = "envd"
    CONNECT = "connect"
    INTERPRETER = "interpreter"


def family_of(path: str, headers: MutableMapping[str, str] | None = None) -> Family:
    """Which API a request is for, from its path (and the E2B routing headers
    for paths no route has).  An unknown path outside ``/v1`` answers in the
    E2B shape, since E2B's SDKs are the clients that call paths without a prefix."""
    if path == "/v1" or path.startswith(("/v1/", "/console")):  # the console is ours too
        return Family.OWN
    if path.startswith(("/sandboxes", "/v2/sandboxes")):
        return Family.CONTROL
    if _CONNECT_PATH.match(path):
        return Family.CONNECT
    h = headers or {}
    if path in ("/execute", "/contexts") or path.startswith("/contexts/"):
        return Family.INTERPRETER
    if h.get("e2b-sandbox-port") == "49999":
        return Family.INTERPRETER
    if path in ("/files", "/health") or h.get("e2b-sandbox-id"):
        return Family.ENVD
    return Family.CONTROL


def scope_family(scope: Scope) -> Family:
    """The family :class:`Edge` decided for this request (or decide it now)."""
    fam = scope.get(_SCOPE_FAMILY)
    if isinstance(fam, Family):
        return fam
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    return family_of(scope.get("path", ""), headers)


# -- envelopes ---------------------------------------------------------------------

#: Connect's error codes (connectrpc.com/docs/protocol#error-codes) and their HTTP status.
CONNECT_STATUS = {
    "canceled": 408,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 408,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}
#: HTTP status -> Connect code, for errors that were decided as HTTP.
CONNECT_CODES = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    405: "unimplemented",
    409: "already_exists",
    413: "resource_exhausted",
    415: "unimplemented",
    422: "invalid_argument",
    429: "resource_exhausted",
    501: "unimplemented",
    502: "unavailable",
    503: "unavailable",
}
#: HTTP status -> the own API's short code, for errors that were decided as HTTP.
HTTP_CODES = {
    400: "invalid",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "limit",
    500: "internal",
    503: "unavailable",
}


def connect_frame(payload: dict[str, Any], flags: int = 0) -> bytes:
    """One Connect streaming message: flags, big-endian length, JSON."""
    raw = json.dumps(payload).encode()
    return struct.pack(">BI", flags, len(raw)) + raw


def error_payload(
    family: Family, exc: ApiError, *, streaming: bool = False
) -> tuple[int, bytes, str]:
    """``(status, body, content type)`` of ``exc`` in ``family``'s envelope.

    Messages are encoded with ``ensure_ascii``: an error about a bad string
    must be sendable even when it quotes that string."""
    if family is Family.OWN:
        return exc.status, json.dumps(exc.body()).encode(), "application/json"
    msg = exc.message + (f" (rule {exc.rule})" if exc.rule else "")
    if family is Family.CONNECT:
        code = exc.code if exc.code in CONNECT_STATUS else CONNECT_CODES.get(exc.status)
        code = code or ("internal" if exc.status >= 500 else "invalid_argument")
        if streaming:
            end = connect_frame({"error": {"code": code, "message": msg}}, flags=0x02)
            return 200, end, "application/connect+json"
        body = json.dumps({"code": code, "message": msg}).encode()
        return exc.status, body, "application/json"
    return exc.status, json.dumps({"code": exc.status, "message": msg}).encode(), "application/json"


def is_streaming(scope: Scope) -> bool:
    return str(scope.get("path", "")).lstrip("/") in CONNECT_STREAMING


async def send_error(scope: Scope, send: Send, exc: ApiError) -> None:
    """Answer ``exc`` in the request's family envelope, straight over ASGI."""
    status, body, ctype = error_payload(scope_family(scope), exc, streaming=is_streaming(scope))
    headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- strict JSON -----------------------------------------------------------------


def _bad(message: str) -> ApiError:
    return ApiError(400, "invalid", message)


class _Refused:
    """Stands in for a number the parser must not accept, so the walk that
    follows can say *where* it was (``body.timeout: NaN is ...``)."""

    def __init__(self, why: str) -> None:
        self.why = why


def _constant(name: str) -> Any:
    return _Refused(f"{name} is not a JSON number (NaN and Infinity are not allowed)")


def _float(text: str) -> Any:
    value = float(text)
    if not math.isfinite(value):
        return _Refused(f"the number {text[:40]} is out of range")
    return value


def _int(text: str) -> Any:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        return _Refused(f"an integer of {len(text.lstrip('-'))} digits is out of range")
    return int(text)


def _where(path: list[str | int]) -> str:
    out = "body"
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else f".{p}" if p.isidentifier() else f"[{p!r}]"
    return out


def surrogate_at(text: str) -> int | None:
    """The index of the first lone UTF-16 surrogate in ``text``, if any."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def check_text(value: str, where: str) -> str:
    """``value`` unchanged, or 400 when it holds a lone surrogate (it cannot be
    stored, logged or sent back as UTF-8)."""
    at = surrogate_at(value)
    if at is not None:
        raise _bad(
            f"{where}: a lone UTF-16 surrogate ({value[at]!a}) at character {at} "
            "is not allowed; send valid Unicode"
        )
    return value


def shown(text: str) -> str:
    """Text from inside a sandbox (a file name, say) as valid Unicode.  Names that
    are not UTF-8 come from ``os.fsdecode`` as lone surrogates, which cannot be
    sent; their bytes become U+FFFD, as envd's Go JSON encoder does."""
    if text.isascii():
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate fsdecode does not make
        return text.encode("utf-8", "replace").decode("utf-8")


def _check_tree(value: Any) -> None:
    """Depth and surrogates, without recursion (a deep value must not crash us)."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if len(path) >= MAX_JSON_DEPTH and isinstance(item, dict | list):
            raise _bad(f"body: nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, _Refused):
            raise _bad(f"{_where(path)}: {item.why}")
        if isinstance(item, str):
            check_text(item, _where(path))
        elif isinstance(item, dict):
            for k, v in item.items():
                check_text(k, _where(path) + " (a key)")
                stack.append((v, [*path, k]))
        elif isinstance(item, list):
            stack.extend((v, [*path, i]) for i, v in enumerate(item))


def strict_json(data: bytes | str) -> Any:
    """Parse ``data`` as strict JSON (RFC 8259), or raise a 400 :class:`ApiError`
    that says what is wrong and where: not UTF-8, not JSON (with the position),
    ``NaN``/``Infinity``, a number out of range, nested too deeply, or a lone
    surrogate (with the field's path)."""
    try:
        value = json.loads(data, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except RecursionError:
        raise _bad(f"body: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except UnicodeDecodeError as exc:
        raise _bad(f"body is not valid UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise _bad(f"body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:  # e.g. an integer past the interpreter's digit limit
        raise _bad(f"body is not acceptable JSON: {exc}") from None
    _check_tree(value)
    return value


def connect_message(body: bytes) -> dict[str, Any]:
    """The one message of a Connect streaming request: ``flags, length, JSON``."""
    if len(body) < 5:
        raise ApiError(400, "invalid_argument", "missing Connect message envelope (5 bytes)")
    flags, n = struct.unpack(">BI", body[:5])
    if flags & 0x01:
        raise ApiError(501, "unimplemented", "compressed Connect messages are not supported")
    if flags & ~0x01:
        raise ApiError(400, "invalid_argument", f"unexpected Connect message flags {flags:#x}")
    if len(body) != 5 + n:
        raise ApiError(
            400,
            "invalid_argument",
            f"Connect envelope says {n} bytes but {len(body) - 5} follow (one message expected)",
        )
    msg = strict_json(body[5:] or b"{}")
    if not isinstance(msg, dict):
        raise ApiError(400, "invalid_argument", "the Connect message is not a JSON object")
    return msg


async def read_json(request: Any) -> Any:
    """The request's JSON body, strictly parsed: the value :class:`Edge` already
    parsed, or (when it did not, e.g. an unusual content type) parsed now."""
    box = request.scope.get(_SCOPE_JSON)
    if box is not None:
        return box[0]
    body: bytes = await request.body()
    if len(body) > INLINE_BYTES:
        return await anyio.to_thread.run_sync(strict_json, body)
    return strict_json(body)


# -- the middleware ------------------------------------------------------------------


def _inflate_stream(data: bytes, wbits: int, room: int, encoding: str) -> tuple[bytes, bytes]:
    """One compressed stream of ``data``: (its output, the bytes after it).
    Never produces more than ``room + 1`` bytes, whatever the input claims."""
    d = zlib.decompressobj(wbits)
    out = d.decompress(data, room + 1)
    if len(out) > room:
        raise _too_large(room, decoded=True)
    if not d.eof:
        raise _bad(f"body is not valid {encoding}: it ends early")
    return out, d.unused_data


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """Decode ``body`` in bounded steps: at most ``limit`` bytes ever come out."""
    try:
        if encoding == "deflate":
            try:
                out, rest = _inflate_stream(body, 15, limit, encoding)
            except zlib.error:  # "deflate" is often sent raw, without zlib's header
                out, rest = _inflate_stream(body, -15, limit, encoding)
            if rest:
                raise _bad("body has bytes after its deflate stream")
            return out
        parts: list[bytes] = []
        total = 0
        rest = body
        while rest:  # gzip may hold several members, one after another
            out, rest = _inflate_stream(rest, 31, limit - total, encoding)
            total += len(out)
            parts.append(out)
        return b"".join(parts)
    except zlib.error as exc:
        raise _bad(f"body is not valid {encoding} ({exc})") from None
    except ApiError as exc:
        if exc.status == 413:
            raise _too_large(limit, decoded=True) from None
        raise


def _too_large(limit: int, *, decoded: bool = False) -> ApiError:
    what = "decoded request body" if decoded else "request body"
    return ApiError(
        413, "too_large", f"{what} exceeds {limit} bytes", rule="serve.max_request_bytes"
    )


class _Disconnected(Exception):
    pass


class Edge:
    """ASGI middleware: bounded body, decoded and strictly parsed, or an error in
    the family's envelope before any handler runs (see the module docstring)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        scope[_SCOPE_FAMILY] = family_of(scope.get("path", ""), headers)
        query = scope.get("query_string", b"").decode("latin-1")
        port = target_of(scope.get("path", ""), query, headers, scope.get("raw_path"))
        scope[SCOPE_PORT] = port  # decided once, here: PortRelay acts on it
        relayed = port is not None
        try:
            body = await self._read(headers, receive)
            # A body for a sandbox's own server is its data: bounded, never decoded.
            encoding = None if relayed else self._encoding(headers)
            work = len(body) > INLINE_BYTES or encoding is not None
            if relayed:
                parsed = None
            elif work:
                body, parsed = await anyio.to_thread.run_sync(
                    self._decode, scope, headers, body, encoding
                )
            else:
                body, parsed = self._decode(scope, headers, body, encoding)
        except ApiError as exc:
            await send_error(scope, send, exc)
            return
        except _Disconnected:
            return
        if parsed is not None:
            scope[_SCOPE_JSON] = parsed  # a 1-tuple: JSON null is a value too
        if encoding is not None:  # the app sees the decoded body, so no encoding
            scope["headers"] = [
                (k, v)
                for k, v in scope["headers"]
                if k.lower() not in (b"content-encoding", b"content-length")
            ] + [(b"content-length", str(len(body)).encode())]
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, headers: dict[str, str], receive: Receive) -> bytes:
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise _bad(f"Content-Length {declared[:40]!r} is not a number")
            if int(declared) > self.limit:
                raise _too_large(self.limit)
        chunks: list[bytes] = []
        seen = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise _Disconnected()
            if msg["type"] != "http.request":
                continue
            part = msg.get("body", b"")
            seen += len(part)
            if seen > self.limit:
                raise _too_large(self.limit)
            if part:
                chunks.append(part)
            if not msg.get("more_body", False):
                return b"".join(chunks)

    def _encoding(self, headers: dict[str, str]) -> str | None:
        raw = headers.get("content-encoding", "")
        codings = [c.strip().lower() for c in raw.split(",") if c.strip()]
        codings = [c for c in codings if c != "identity"]
        if not codings:
            return None
        if len(codings) > 1 or codings[0] not in _ENCODINGS:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"Content-Encoding {raw[:60]!r} is not supported (use gzip, deflate or identity)",
            )
        return codings[0]

    def _decode(
        self, scope: Scope, headers: dict[str, str], body: bytes, encoding: str | None
    ) -> tuple[bytes, tuple[Any] | None]:
        if encoding is not None and body:
            body = _inflate(body, encoding, self.limit)
        family = scope[_SCOPE_FAMILY]
        method = scope.get("method", "GET")
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if family is Family.CONNECT:
            if method != "POST":
                return body, None
            if is_streaming(scope):
                if ctype not in ("", "application/connect+json"):
                    raise ApiError(
                        415,
                        "unimplemented",
                        f"content type {ctype!r} is not supported: glassroom speaks "
                        "application/connect+json",
                    )
                return body, (connect_message(body),)
            if ctype not in ("", "application/json"):
                raise ApiError(
                    415,
                    "unimplemented",
                    f"content type {ctype!r} is not supported: glassroom speaks application/json",
                )
            return body, (strict_json(body or b"{}"),)
        if not body:
            return body, None
        jsonish = ctype == "application/json" or ctype.endswith("+json")
        if family in (Family.CONTROL, Family.INTERPRETER) and ctype in ("", "text/plain"):
            jsonish = True  # their handlers read JSON whatever the content type says
        if not jsonish or family is Family.ENVD or scope.get("path", "").endswith("/files"):
            return body, None  # a file's bytes are data, whatever their content type says
        return body, (strict_json(body),)
