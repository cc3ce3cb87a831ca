"""Taking proxy credentials back out of responses before they reach the sandbox.

A host the credential is meant for can still send it back: an echo
endpoint, an API that returns the request's headers, an error page quoting
them.  The proxy passes every response it can see through a
:class:`Redactor`, which replaces each occurrence of a secret with its
placeholder.

Why equal lengths: the placeholder is as long as the value (see
``credentials.issue``), and every other form below is replaced by a string
of its own length.  So a body keeps its exact size, Content-Length stays
right, and nothing has to be buffered or re-framed; the cost is that the
placeholder tells the sandbox how long the value is, which a token's format
usually says anyway.

Besides the raw bytes, a few forms a server produces without being asked to
transform anything are covered: percent-encoding (upper and lower case
hex, ``+`` for space), JSON string escaping, hex, base64 (standard and
URL-safe, at each of the three byte alignments, so the secret is found
inside a longer encoded text such as ``base64("user:" + secret)``), UTF-16
and UTF-7 (as a server answering in another charset sends it), HTML
escaping, and per-character escapes of some or all of the value's
punctuation (``&#x2b;``, ``&#43;``, ``\\u002b``, ``\\x2b``, ``%2b``, ``=2b``), as
template engines and encoders apply them.  Matching ignores ASCII case, so
a value whose case was changed (or whose hex or percent-encoding is in
either case, or in a header name, which h11 lowers) is found too.
A host that transforms the value in any other way (encrypts, hashes, slices,
reverses, base32) defeats this: see docs/credentials.md.
"""

from __future__ import annotations

import base64
import functools
import html
import itertools
import json
import re
from collections import Counter
from urllib.parse import quote, quote_plus

_RUN = re.compile(rb"[a-z0-9]+")


@functools.lru_cache(maxsize=4096)
def _longest_run(needle: bytes) -> bytes:
    """The needle's longest run of letters and digits (a Redactor is made per request)."""
    return max(_RUN.findall(needle), key=len, default=b"")

#: (needle, replacement of the same length, owner): owner is an index the
#: caller uses to say whose secret was found.
Pair = tuple[bytes, bytes, int]


def _filler(placeholder: bytes, n: int) -> bytes:
    """``n`` bytes made of the placeholder, for forms longer than it."""
    return (placeholder * (n // max(1, len(placeholder)) + 1))[:n]


def _b64_cores(data: bytes, alt: bytes | None) -> list[bytes]:
    """The base64 characters that depend on ``data`` alone, at each alignment."""
    out = []
    for k in range(3):
        enc = base64.b64encode(b"\0" * k + data)
        start, end = -(-8 * k // 6), 8 * (k + len(data)) // 6
        core = enc[start:end]
        out.append(core if alt is None else core.translate(bytes.maketrans(b"+/", alt)))
    return out


def forms(secret: bytes, placeholder: bytes, owner: int) -> list[Pair]:
    """Every form of ``secret`` to look for, each with its same-length replacement."""
    if len(secret) != len(placeholder):
        raise ValueError("a placeholder must be exactly as long as its value")
    pairs: dict[bytes, bytes] = {secret: placeholder}
    text = secret.decode("utf-8", "surrogateescape")
    encoded = set()
    for q in (quote(secret, safe=""), quote(secret, safe="/"), quote_plus(secret, safe="")):
        encoded.add(q)
        encoded.add(re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), q))
    js = json.dumps(text)[1:-1]
    encoded.update({js, js.replace("/", "\\/"), json.dumps(text, ensure_ascii=False)[1:-1]})
    encoded.add(html.escape(text))
    punct = sorted({c for c in text if c.isascii() and not c.isalnum()})
    if len(punct) <= 3:
        chosen = [set(x) for n in range(1, len(punct) + 1)
                  for x in itertools.combinations(punct, n)]  # fmt: skip
    else:
        chosen = [set(punct)] + [{c} for c in punct]
    for style in ("&#x{:x};", "&#{:d};", "\\u{:04x}", "\\x{:02x}", "%{:02x}", "={:02x}"):
        for which in chosen:
            encoded.add("".join(style.format(ord(c)) if c in which else c for c in text))
    for form in encoded:
        raw = form.encode("utf-8", "surrogateescape")
        pairs.setdefault(raw, _filler(placeholder, len(raw)))
    pairs.setdefault(secret.hex().encode(), placeholder.hex().encode())
    ptext = placeholder.decode("latin-1")
    for wide in ("utf-16-le", "utf-16-be"):  # not UTF-32: 4x as long, 4x held back
        raw = text.encode(wide, "surrogatepass")
        pairs.setdefault(raw, _filler(ptext.encode(wide), len(raw)))
    try:
        raw = text.encode("utf-7")
        pairs.setdefault(raw, _filler(placeholder, len(raw)))
    except UnicodeError:
        pass
    for alt in (None, b"-_"):
        for core, rep in zip(_b64_cores(secret, alt), _b64_cores(placeholder, alt), strict=True):
            if core:
                pairs.setdefault(core, rep)
    # Matching ignores ASCII case (Redactor): one needle per lowered form.
    folded: dict[bytes, bytes] = {}
    for n, r in pairs.items():
        folded.setdefault(n.lower(), r)
    return [(n, r, owner) for n, r in folded.items()]


class Redactor:
    """Replaces every form of every secret in a stream of chunks.

    ``feed`` returns what may go out now; the last ``longest - 1`` bytes are
    kept back, so a secret split across two reads (or two chunks of a
    chunked body) is still whole when it is looked for.  ``end`` returns
    what was kept.  The output is exactly as long as the input.
    """

    def __init__(self, pairs: list[Pair]) -> None:
        # Longest first: a longer form is replaced before a shorter one inside it.
        self.pairs = sorted(pairs, key=lambda p: -len(p[0]))
        self.keep = max((len(p[0]) for p in pairs), default=1) - 1
        # Each needle with its longest run of letters and digits: most forms
        # escape only punctuation, so many share one run, and a run that is
        # not in the data rules out every needle that contains it.
        self.runs = {n: _longest_run(n) for n, _, _ in pairs}
        self.run_set = tuple(set(self.runs.values()))
        self.tail = b""
        self.counts: Counter[int] = Counter()

    def apply(self, data: bytes) -> bytes:
        """Replace in one complete piece (a header); counts what was found.

        Needles are lower case (``forms``); they are looked for in a lowered
        copy, so a match ignores ASCII case, and replaced in the original.
        """
        hay: bytes | bytearray = data.lower()
        out: bytearray | None = None
        absent = {r for r in self.run_set if r not in hay}
        for needle, rep, owner in self.pairs:
            if self.runs[needle] in absent:
                continue
            i = hay.find(needle)
            if i < 0:
                continue
            if out is None:
                out, hay = bytearray(data), bytearray(hay)
            assert isinstance(hay, bytearray)
            low, size = rep.lower(), len(needle)
            while i >= 0:
                out[i : i + size] = rep
                hay[i : i + size] = low
                self.counts[owner] += 1
                i = hay.find(needle, i + size)
        return data if out is None else bytes(out)

    def feed(self, data: bytes) -> bytes:
        buf = self.apply(self.tail + data)
        cut = max(0, len(buf) - self.keep)
        self.tail = buf[cut:]
        return buf[:cut]

    def end(self) -> bytes:
        rest, self.tail = self.tail, b""
        return rest
