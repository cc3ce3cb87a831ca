"""Tamper-evident audit log: every sandbox event, one hash-chained JSON line each.

Writers append with :class:`AuditLog` (thread- and multi-process-safe,
fsync'd; :meth:`AuditLog.append_many` batches traced events under one
fsync); the chain head is signed into ``<log>.anchor`` with the supervisor's
Ed25519 key so a rewrite of the whole chain is caught too; records can be
forwarded to syslog receivers (``GLASSROOM_AUDIT_SINKS``).  :func:`verify`
walks the chain, checks the anchor and names each changed, deleted, inserted
or reordered record; :func:`read_records`, :func:`select`,
:func:`format_table` and :func:`format_timeline` back ``glassroom audit
show``.  See ``docs/audit.md``.
"""

from __future__ import annotations

from ._anchor import AnchorKey, anchor_path, load_or_create_key, load_public_key
from ._log import DECISIONS, GENESIS_HASH, MAX_RECORD_BYTES, AuditLog, record_hash
from ._query import TYPES, format_table, format_timeline, read_records, record_type, select
from ._sinks import SinkStats, parse_sink_url
from ._verify import VerifyResult, verify, verify_or_raise

__all__ = [
    "DECISIONS",
    "GENESIS_HASH",
    "MAX_RECORD_BYTES",
    "TYPES",
    "AnchorKey",
    "AuditLog",
    "SinkStats",
    "VerifyResult",
    "anchor_path",
    "format_table",
    "format_timeline",
    "load_or_create_key",
    "load_public_key",
    "parse_sink_url",
    "read_records",
    "record_hash",
    "record_type",
    "select",
    "verify",
    "verify_or_raise",
]
