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
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from .._errors import AuditError
from ._log import parse_record_line

MAX_WIDTH = 160
TYPES = frozenset({"file", "exec", "net"})
#: ``blocked`` records with one of these ``details.action`` are file accesses (the SDK's file API).
FILE_ACTIONS = frozenset({"read", "write", "list", "mkdir", "remove"})
MARKS = {"allow": "✓", "deny": "✗", "info": "·"}
_TARGET_WIDTH = 96
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


def record_type(rec: dict[str, Any]) -> str | None:
    """``"file"``, ``"exec"``, ``"net"`` or ``None``: which ``--type`` a record belongs to.

    ``file``: ``file.*`` events (traced accesses and the SDK's file API), and
    ``blocked`` records whose ``details.action`` is a file-API op; ``exec``:
    traced ``exec`` and ``command.*``; ``net``: ``network.*``.
    """
    event = str(rec.get("event", ""))
    if event.startswith("file."):
        return "file"
    if event == "blocked":
        details = rec.get("details")
        action = details.get("action") if isinstance(details, dict) else None
        return "file" if action in FILE_ACTIONS else None
    if event == "exec" or event.startswith("command."):
        return "exec"
    if event.startswith("network."):
        return "net"
    return None


def select(
    records: Iterable[dict[str, Any]],
    *,
    sandbox: str | None = None,
    blocked: bool = False,
    event_prefix: str | None = None,
    types: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """Keep records matching every given filter.

    ``sandbox`` matches an id or a prefix of it (the table shows 8 characters);
    ``blocked`` keeps ``decision == "deny"``; ``types`` keeps records of any of
    the given kinds (``file``, ``exec``, ``net``; see :func:`record_type`), so
    the CLI and the SDK filter the same way.  ``_error`` entries are kept only
    when no filter is given, since they cannot be attributed.
    """
    wanted = None if types is None else frozenset(types)
    if wanted is not None and not wanted <= TYPES:
        unknown = ", ".join(sorted(repr(t) for t in wanted - TYPES))
        raise AuditError(f"unknown record type {unknown}: expected file, exec or net")
    filtered = sandbox is not None or blocked or event_prefix is not None or wanted is not None
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
        if wanted is not None and record_type(rec) not in wanted:
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


def _offset(ts: Any, start: datetime | None) -> str:
    when = _parse_ts(ts)
    if when is None or start is None:
        return "?"
    return f"+{(when - start).total_seconds():.3f}s"


def _parse_ts(ts: Any) -> datetime | None:
    try:
        return datetime.strptime(str(ts), "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        return None


def _argv(value: Any) -> str:
    if isinstance(value, list):
        return shlex.join(str(v) for v in value)
    return "" if value is None else str(value)


def timeline_fields(rec: dict[str, Any]) -> tuple[str, str, str, str]:
    """``(op, target, flags, result)`` of one record for the timeline (unescaped).

    Traced events (``file.*``, ``exec``; schema in ``_events.py``) carry
    ``path``/``path2``/``flags``/``argv``/``result``; the supervisor's own
    events are mapped to the closest reading; anything else shows its event
    name and a summary of its details.
    """
    event = str(rec.get("event", ""))
    raw = rec.get("details")
    d: dict[str, Any] = raw if isinstance(raw, dict) else {}
    result = "" if d.get("result") is None else str(d["result"])
    if event.startswith("file.") and ("syscall" in d or "result" in d):
        target = str(d.get("path", ""))
        if d.get("path2") is not None:
            target += f" -> {d['path2']}"
        flags = str(d.get("flags") or "")
        if d.get("mode") is not None:
            flags = f"{flags} mode={d['mode']}".strip()
        return event[5:], target, flags, result
    if event.startswith("file."):  # the SDK's file API: {"path": ...}
        return event[5:], str(d.get("path", "")), "", result
    if event == "exec":
        shown = _argv(d.get("argv")) or str(d.get("path", ""))
        argv0 = (d.get("argv") or [""])[0] if isinstance(d.get("argv"), list) else ""
        path = str(d.get("exe") or d.get("path") or "")
        # argv[0] is the caller's choice: when it does not name what ran, show that.
        if path and argv0 not in (path, path.rsplit("/", 1)[-1]):
            shown = f"{path} ← {shown}"
        return "exec", shown, "", result
    if event == "blocked":
        return str(d.get("action", "blocked")), str(d.get("target", "")), "", "blocked"
    if event == "command.started":
        return "run", _argv(d.get("argv")), "background" if d.get("background") else "", ""
    if event == "command.ended":
        if d.get("timed_out"):
            outcome = "timed out"
        elif d.get("signal"):
            outcome = f"signal {d['signal']}"
        else:
            outcome = f"exit {d.get('exit_code', '?')}"
        return "exit", str(d.get("argv0", "")), "", outcome
    if event == "network.request" and d.get("host"):
        port = f":{d['port']}" if d.get("port") else ""
        op = str(d.get("method") or d.get("kind") or "request")
        status = "" if d.get("status") is None else str(d["status"])
        return op, f"{d['host']}{port}{d.get('path') or ''}", "", status
    if event == "network.direct" and d.get("syscall"):  # a socket call that bypassed the proxy
        if d.get("address") is not None:
            port = f":{d['port']}" if d.get("port") is not None else ""
            return str(d["syscall"]), f"{d['address']}{port}", "", result
        return str(d["syscall"]), str(d.get("what", "")), "", result
    return event, summarize(d), "", result


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_timeline(records: Iterable[dict[str, Any]]) -> str:
    """A readable per-sandbox view: time offsets, allowed/denied marks, op, target, result.

    One block per sandbox (in order of first appearance), each line::

        +0.104s  ✗ open  /etc/passwd  O_WRONLY|O_CREAT  → EROFS  [filesystem.write]

    The offset is from the sandbox's first record shown; ✓ allowed, ✗ denied
    (with the rule in brackets), · information.  Text from the sandbox is
    escaped as in :func:`format_table`; targets longer than 96 characters are
    cut.  Unreadable lines are listed at the end.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    errors: list[dict[str, Any]] = []
    for rec in records:
        if "_error" in rec:
            errors.append(rec)
        else:
            groups.setdefault(str(rec.get("sandbox", "")), []).append(rec)
    if not groups and not errors:
        return "(no records)"
    out: list[str] = []
    for sandbox, recs in groups.items():
        start = next((t for t in (_parse_ts(r.get("ts")) for r in recs) if t), None)
        first = _safe(str(recs[0].get("ts", "")))
        noun = "record" if len(recs) == 1 else "records"
        out.append(f"sandbox {_safe(sandbox)}  ({len(recs)} {noun}, from {first})")
        rows = [(r, timeline_fields(r)) for r in recs]
        offsets = [_offset(r.get("ts"), start) for r in recs]
        off_w = max(len(o) for o in offsets)
        op_w = min(12, max(len(_safe(f[0])) for _, f in rows))
        for (rec, (op, target, flags, result)), offset in zip(rows, offsets, strict=True):
            decision = str(rec.get("decision", ""))
            parts = [f"{offset:>{off_w}}", f"{MARKS.get(decision, '?')} {_safe(op):<{op_w}}"]
            if target:
                parts.append(_cut(_safe(target), _TARGET_WIDTH))
            if flags:
                parts.append(_safe(flags))
            if result:
                parts.append(f"→ {_safe(result)}")
            if decision == "deny":
                parts.append(f"[{_safe(str(rec.get('rule') or '-'))}]")
            out.append("  " + "  ".join(parts).rstrip())
        out.append("")
    if errors:
        out.append("unreadable lines")
        out.extend(f"  line {e.get('_line')}: {_safe(str(e['_error']))}" for e in errors)
    return "\n".join(out).rstrip("\n")
