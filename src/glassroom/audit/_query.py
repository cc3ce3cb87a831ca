"""Reading, filtering and formatting audit records for ``glassroom audit show``.

Reading does not check the chain (that is :func:`glassroom.audit.verify`'s
job) but it never hides a line either: a line that is not a record is yielded
as ``{"_error": reason, "_line": N}`` so a display can show that something is
there.  Record text comes from sandboxed code (argv, paths), so the table
escapes control and format characters: an agent must not be able to paint the
operator's terminal with escape sequences or bidi overrides.
"""

from __future__ import annotations

import json
import shlex
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from .._errors import AuditError
from ._log import parse_record_line

MAX_WIDTH = 160
_COMMAND_KEYS = ("argv", "cmd", "command")
_EXIT_KEYS = ("exit_code", "returncode", "exit")
_FIRST = (*_COMMAND_KEYS, *_EXIT_KEYS, "signal", "path", "paths", "reason")


def read_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield every line of the log in order: records, or ``{"_error", "_line"}`` entries.

    The file is opened now (so a missing or unreadable file raises
    :class:`AuditError` at the call, not at the first ``next``).
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the generator
    except FileNotFoundError:
        raise AuditError(f"audit log {path} does not exist") from None
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror}") from exc
    return _iterate(f, path)


def _iterate(f: IO[bytes], path: str | Path) -> Iterator[dict[str, Any]]:
    with f:
        try:
            for number, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    yield {"_error": "torn record (no trailing newline)", "_line": number}
                    continue
                rec = parse_record_line(raw[:-1])
                if isinstance(rec, str):
                    yield {"_error": f"unparseable record ({rec})", "_line": number}
                else:
                    yield rec
        except OSError as exc:
            raise AuditError(f"cannot read audit log {path}: {exc.strerror}") from exc


def select(
    records: Iterable[dict[str, Any]],
    *,
    sandbox: str | None = None,
    blocked: bool = False,
    event_prefix: str | None = None,
) -> list[dict[str, Any]]:
    """Keep records matching every given filter.

    ``sandbox`` matches an id or a prefix of it (the table shows 8 characters);
    ``blocked`` keeps ``decision == "deny"``.  ``_error`` entries are kept only
    when no filter is given, since they cannot be attributed.
    """
    filtered = sandbox is not None or blocked or event_prefix is not None
    out: list[dict[str, Any]] = []
    for rec in records:
        if "_error" in rec:
            if not filtered:
                out.append(rec)
            continue
        if sandbox is not None and not str(rec.get("sandbox", "")).startswith(sandbox):
            continue
        if blocked and rec.get("decision") != "deny":
            continue
        if event_prefix is not None and not str(rec.get("event", "")).startswith(event_prefix):
            continue
        out.append(rec)
    return out


def _safe(text: str) -> str:
    """Escape control/format characters so record text cannot drive the terminal."""
    if text.isprintable():
        return text
    out: list[str] = []
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _compact(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def summarize(details: dict[str, Any]) -> str:
    """One-line summary: the command, its exit code, paths, then the other keys."""
    parts: list[str] = []
    order = sorted(details, key=lambda k: (_FIRST.index(k) if k in _FIRST else len(_FIRST), k))
    for key in order:
        value = details[key]
        if key == "_truncated":
            continue
        if key in _COMMAND_KEYS and isinstance(value, list):
            parts.append(shlex.join(str(v) for v in value))
        elif key in _COMMAND_KEYS and isinstance(value, str):
            parts.append(value)
        elif key in _EXIT_KEYS:
            parts.append(f"exit={_compact(value)}")
        else:
            parts.append(f"{key}={_compact(value)}")
    if details.get("_truncated"):
        parts.append("[truncated]")
    return " ".join(parts)


def _time(ts: Any) -> str:
    text = str(ts)
    # "2026-11-27T02:40:00.123456Z" -> "02:40:00.123"
    return text[11:23] if len(text) >= 23 and text[10] == "T" else text[:12]


def _clip(line: str) -> str:
    return line if len(line) <= MAX_WIDTH else line[: MAX_WIDTH - 1] + "…"


def format_table(records: Iterable[dict[str, Any]]) -> str:
    """Render records one per line (times UTC), each at most 160 characters.

    Returns ``"(no records)"`` for an empty input so the CLI always prints something.
    """
    rows = list(records)
    if not rows:
        return "(no records)"
    good = [r for r in rows if "_error" not in r]
    seq_w = max([3, *(len(str(r.get("seq", ""))) for r in good)])
    event_w = min(20, max([5, *(len(_safe(str(r.get("event", "")))) for r in good)]))
    rule_w = min(24, max([4, *(len(_safe(str(r.get("rule") or "-"))) for r in good)]))
    header = (
        f"{'SEQ':>{seq_w}}  {'TIME':<12}  {'SANDBOX':<8}  {'EVENT':<{event_w}}  "
        f"{'DECISION':<8}  {'RULE':<{rule_w}}  DETAILS"
    )
    lines = [_clip(header.rstrip())]
    for r in rows:
        if "_error" in r:
            lines.append(_clip(f"{'!':>{seq_w}}  line {r.get('_line')}: {_safe(str(r['_error']))}"))
            continue
        details = r.get("details")
        line = (
            f"{r.get('seq', ''):>{seq_w}}  {_safe(_time(r.get('ts', ''))):<12}  "
            f"{_safe(str(r.get('sandbox', '')))[:8]:<8}  "
            f"{_safe(str(r.get('event', ''))):<{event_w}}  "
            f"{_safe(str(r.get('decision', ''))):<8}  "
            f"{_safe(str(r.get('rule') or '-')):<{rule_w}}  "
            f"{_safe(summarize(details)) if isinstance(details, dict) else ''}"
        )
        lines.append(_clip(line.rstrip()))
    return "\n".join(lines)
