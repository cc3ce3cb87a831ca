"""Tamper-evident audit log: every sandbox event, one hash-chained JSON line each.

Writers append with :class:`AuditLog` (thread- and multi-process-safe,
fsync'd); :func:`verify` walks the chain and names each changed, deleted,
inserted or reordered record; :func:`read_records`, :func:`select` and
:func:`format_table` back ``glassroom audit show``.  See ``docs/audit.md``.
"""

from __future__ import annotations

from ._log import DECISIONS, GENESIS_HASH, MAX_RECORD_BYTES, AuditLog, record_hash
from ._query import format_table, read_records, select
from ._verify import VerifyResult, verify, verify_or_raise

__all__ = [
    "DECISIONS",
    "GENESIS_HASH",
    "MAX_RECORD_BYTES",
    "AuditLog",
    "VerifyResult",
    "format_table",
    "read_records",
    "record_hash",
    "select",
    "verify",
    "verify_or_raise",
]
