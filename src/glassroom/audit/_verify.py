"""Verification of an audit log's hash chain.

One walk over the lines, in file order, with three independent checks so each
kind of tampering shows up as a problem that names its line and seq:

1. **hash** - each record's ``hash`` must equal sha256 of its canonical JSON
   without ``hash``, and the line must be byte-for-byte canonical.  Fails when a
   record's content was changed.
2. **prev link** - each record's ``prev`` must equal the ``hash`` stored in the
   record on the line before it (64 zeros for the first).  Fails at every seam
   where records were removed, inserted, moved, or rewritten-and-rehashed.
3. **seq** - seqs must run 1, 2, 3, ...  A seq *above* the highest seen so far
   opens a gap; a seq *at or below* it either fills an open gap (the record was
   moved: **reordered**) or repeats a seq already seen (**inserted**).  When the
   walk ends, gap seqs never seen anywhere were **deleted**.

Unparseable or torn lines are reported and skipped: the chain is checked
across them, exactly as the writer chains across a torn line after a crash.

What the chain alone cannot see: records removed from the END of the file,
or a whole chain rewritten and rehashed from some point on (sha256 is
unkeyed).  That is what the **anchor** is for: when ``<log>.anchor`` exists
(see :mod:`glassroom.audit._anchor`), its Ed25519 signature is checked and
the record it names must still be in the file with the same hash; records
after it are fine (they are just not anchored yet).  When the anchor key
exists but the anchor file does not, a non-empty log is reported too, so
deleting the anchor cannot hide a rewrite.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .._errors import AuditError, AuditIntegrityError
from . import _anchor
from ._anchor import PublicKeySource
from ._log import GENESIS_HASH, canonical_json, parse_record_line, record_hash

_RECENT = 10_000  # how many hashes/seqs to remember for explanatory hints
_R_PARSE, _R_HASH, _R_SEQ, _R_LINK = range(4)  # order of problems on one line


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`.

    ``records`` counts valid records; ``last_seq``/``last_hash`` are those of the
    last valid record (what the writer would chain from), ``None`` if there is none.
    ``anchored_seq`` is the seq the anchor vouches for (``None``: no anchor was
    checked); records after it passed the chain check but are not anchored
    yet.  ``anchor_status`` is one human line about the anchor, for display.
    """

    ok: bool
    records: int
    problems: list[str]
    last_seq: int | None
    last_hash: str | None
    anchored_seq: int | None = None
    anchor_status: str | None = None


@dataclass
class _Gap:
    """Seqs ``from_seq+1 .. to_seq-1`` were skipped at ``line``."""

    prev_line: int | None
    line: int
    from_seq: int
    to_seq: int
    found: dict[int, int] = field(default_factory=dict)  # seq -> line it showed up later

    @property
    def size(self) -> int:
        return self.to_seq - self.from_seq - 1


def _ranges(numbers: Iterable[int], limit: int = 5) -> str:
    """``[5, 6, 7, 9]`` -> ``"5-7, 9"`` (at most ``limit`` ranges)."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in spans[:limit]]
    return ", ".join(parts) + (", …" if len(spans) > limit else "")


def _plural(word: str, numbers: list[int]) -> str:
    many = len(numbers) > 1
    return f"{word}{'s' if many else ''} {_ranges(numbers)}"


def _missing(gap: _Gap, limit: int = 5) -> str:
    """The gap's seqs that never turned up, as ranges: ``"seq 5"``, ``"seqs 5-7, 9"``."""
    spans: list[tuple[int, int]] = []
    start = gap.from_seq + 1
    for seen in [*sorted(gap.found), gap.to_seq]:
        if seen > start:
            spans.append((start, seen - 1))
        start = seen + 1
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in spans[:limit]]
    many = len(spans) > 1 or spans[0][0] != spans[0][1]
    more = ", …" if len(spans) > limit else ""
    return f"seq{'s' if many else ''} " + ", ".join(parts) + more


class _Walker:
    def __init__(self) -> None:
        self.problems: list[tuple[int, int, int, str]] = []
        self.records = 0
        self.max_seq = 0
        self.prev_hash = GENESIS_HASH
        self.prev_line: int | None = None
        self.prev_seq = 0
        self.open_gaps: list[_Gap] = []
        self.gaps: list[_Gap] = []
        self.recent_hash: dict[str, tuple[int, int]] = {}  # hash -> (line, seq)
        self.recent_seq: dict[int, int] = {}  # seq -> first line seen
        self.watch_seq: int | None = None  # the anchored seq
        self.watch_hashes: list[str] = []  # hashes of the records with that seq

    def report(self, line: int, rank: int, message: str) -> None:
        self.problems.append((line, rank, len(self.problems), message))

    def bad_line(self, line: int, reason: str) -> None:
        self.report(line, _R_PARSE, f"line {line}: torn/unparseable record ({reason})")

    def record(self, line: int, raw: bytes, rec: dict[str, Any]) -> None:
        self.records += 1
        seq: int = rec["seq"]
        if record_hash(rec) != rec["hash"]:
            self.report(
                line, _R_HASH, f"record seq={seq} (line {line}): hash mismatch — record was changed"
            )
        elif raw != canonical_json(rec):
            self.report(
                line,
                _R_HASH,
                f"record seq={seq} (line {line}): not in canonical form — line was edited",
            )
        if rec["prev"] != self.prev_hash:
            self.report(line, _R_LINK, self.link_message(line, seq, rec["prev"]))
        self.check_seq(line, seq)
        if seq == self.watch_seq:
            self.watch_hashes.append(rec["hash"])
        self.max_seq = max(self.max_seq, seq)
        self.prev_hash, self.prev_line, self.prev_seq = rec["hash"], line, seq
        self.remember(self.recent_hash, rec["hash"], (line, seq))
        if seq not in self.recent_seq:
            self.remember(self.recent_seq, seq, line)

    @staticmethod
    def remember(table: dict[Any, Any], key: Any, value: Any) -> None:
        table[key] = value
        if len(table) > _RECENT:
            del table[next(iter(table))]

    def check_seq(self, line: int, seq: int) -> None:
        if seq == self.max_seq + 1:
            return
        if seq > self.max_seq + 1:
            gap = _Gap(self.prev_line, line, self.max_seq, seq)
            self.gaps.append(gap)
            self.open_gaps.append(gap)
            return
        for gap in self.open_gaps:
            if gap.from_seq < seq < gap.to_seq and seq not in gap.found:
                gap.found[seq] = line  # a skipped seq turned up later: it was moved
                if len(gap.found) == gap.size:
                    self.open_gaps.remove(gap)
                return
        first = self.recent_seq.get(seq)
        where = f" (seq {seq} also at line {first})" if first is not None else ""
        self.report(
            line,
            _R_SEQ,
            f"line {line}: seq {seq} appears again / out of order — record inserted{where}",
        )

    def link_message(self, line: int, seq: int, prev: str) -> str:
        head = f"record seq={seq} (line {line}): prev link broken — "
        if self.prev_line is None:
            return head + "the first record's prev must be 64 zeros"
        head += (
            f"prev does not match the hash of the record before it "
            f"(seq={self.prev_seq}, line {self.prev_line})"
        )
        if prev == GENESIS_HASH:
            return head + "; it claims to be the first record"
        target = self.recent_hash.get(prev)
        if target is not None:
            return head + f"; it links to seq={target[1]} (line {target[0]})"
        return head + "; it links to no record before it"

    def finish(self) -> list[str]:
        for gap in self.gaps:
            if gap.found:
                self.report(
                    gap.line,
                    _R_SEQ,
                    f"line {gap.line}: seq {gap.to_seq} out of order — records reordered "
                    f"({_plural('seq', list(gap.found))} "
                    f"appear{'s' if len(gap.found) == 1 else ''} later, at "
                    f"{_plural('line', list(gap.found.values()))})",
                )
            deleted = gap.size - len(gap.found)
            if deleted:
                if gap.prev_line is None:
                    where = f"before line {gap.line}: seq starts at {gap.to_seq}"
                else:
                    where = (
                        f"between line {gap.prev_line} and {gap.line}: "
                        f"seq jumps {gap.from_seq} -> {gap.to_seq}"
                    )
                noun = "record" if deleted == 1 else "records"
                self.report(
                    gap.line,
                    _R_SEQ,
                    f"{where} — {deleted} {noun} deleted ({_missing(gap)})",
                )
        return [p[3] for p in sorted(self.problems)]


def _find_key(
    pubkey: PublicKeySource | None,
) -> tuple[Ed25519PublicKey | None, str | None]:
    """``(key, problem)``: the given key, else the configured one, else none.

    A key passed explicitly that cannot be read raises (the caller asked for
    it); a broken configured one is a problem of this verification.
    """
    if pubkey is not None:
        try:
            return _anchor.load_public_key(pubkey), None
        except FileNotFoundError:
            raise AuditError(f"public key file {pubkey!s} does not exist") from None
    try:
        found = _anchor.find_public_key()
    except AuditError as exc:
        return None, f"cannot use the configured anchor key: {exc}"
    return (found[0], None) if found is not None else (None, None)


def _check_anchor(
    path: str | Path,
    anchor: dict[str, Any] | str | None,
    walker: _Walker,
    pubkey: PublicKeySource | None,
) -> tuple[list[str], int | None, str]:
    """``(problems, anchored_seq, status line)`` for the anchor of the log at ``path``."""
    where = _anchor.anchor_path(path)
    key, key_problem = _find_key(pubkey)
    problems = [key_problem] if key_problem else []
    if isinstance(anchor, str):
        return [*problems, f"anchor {where} is not a valid anchor ({anchor})"], None, "invalid"
    if anchor is None:
        if key is None:
            return problems, None, "none (no anchor key)"
        if Path(path).stat().st_size == 0:
            return problems, None, "none (empty log)"
        problems.append(
            f"no anchor file {where}, but the anchor key {_anchor.key_id(key)} exists: the "
            "anchor was deleted (which would hide a rewrite or truncation of the log), or "
            "this log was written with anchoring off"
        )
        return problems, None, "MISSING"
    seq, expected = anchor["seq"], anchor["hash"]
    if key is not None:
        bad_sig = _anchor.signature_problem(anchor, key)
        if bad_sig:
            problems.append(bad_sig)
    if expected not in walker.watch_hashes:
        says = f"the log was rewritten or truncated: anchor says seq {seq} has hash {expected}"
        if not walker.watch_hashes:
            last = walker.prev_seq if walker.prev_line is not None else "none"
            problems.append(f"{says}, but the log has no record with seq {seq} (last seq {last})")
        else:
            problems.append(f"{says}, but the log's seq {seq} has hash {walker.watch_hashes[0]}")
    signer = f"signed by key {anchor['key_id']}"
    if key is None:
        signer += " (signature not checked: no public key; pass --pubkey)"
    status = f"seq {seq} {signer}, {'FAILED' if problems else 'ok'}"
    later = walker.max_seq - seq
    if not problems and later > 0:
        status += f"; {later} later record{'s' if later != 1 else ''} not anchored yet"
    if anchor["log"] != Path(path).name:
        status += f" (the anchor names log {anchor['log']!r})"
    return problems, seq, status


def verify(path: str | Path, *, pubkey: PublicKeySource | None = None) -> VerifyResult:
    """Check the whole chain of the log at ``path``, and its anchor; name every problem.

    ``pubkey`` (a key, PEM/raw/hex bytes, or a file path) checks the anchor's
    signature; default: the configured ``audit-anchor.pub``.
    """
    anchor = _anchor.read_anchor(_anchor.anchor_path(path))
    walker = _Walker()
    if isinstance(anchor, dict):
        walker.watch_seq = anchor["seq"]
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    walker.bad_line(number, "no trailing newline — incomplete write")
                    continue
                body = raw[:-1]
                rec = parse_record_line(body)
                if isinstance(rec, str):
                    walker.bad_line(number, rec)
                else:
                    walker.record(number, body, rec)
    except FileNotFoundError:
        raise AuditError(f"audit log {path} does not exist") from None
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror}") from exc
    problems = walker.finish()
    anchor_problems, anchored_seq, status = _check_anchor(path, anchor, walker, pubkey)
    problems += anchor_problems
    has_last = walker.prev_line is not None
    return VerifyResult(
        ok=not problems,
        records=walker.records,
        problems=problems,
        last_seq=walker.prev_seq if has_last else None,
        last_hash=walker.prev_hash if has_last else None,
        anchored_seq=anchored_seq,
        anchor_status=status,
    )


def verify_or_raise(path: str | Path, *, pubkey: PublicKeySource | None = None) -> VerifyResult:
    """Like :func:`verify`, but raise :class:`AuditIntegrityError` unless the log is intact."""
    result = verify(path, pubkey=pubkey)
    if not result.ok:
        count = len(result.problems)
        raise AuditIntegrityError(
            f"audit log {path} failed verification ({count} problem"
            f"{'s' if count != 1 else ''}): {result.problems[0]}",
            result.problems,
        )
    return result
