"""User file metadata (E2B's ``files.write(..., metadata=)``, envd >= 0.6.2).

E2B keeps it where the file is: as ``user.e2b.<key>`` extended attributes,
so it moves with a rename and any program in the sandbox may set it
(``os.setxattr``).  Glassroom does the same, and does it *inside* the
sandbox: a short ``python3`` run as the sandbox's user, through its walls,
audited as a command like any other.  No host path is touched.

* A write's ``X-Metadata-<key>: value`` headers replace the file's
  ``user.e2b.*`` attributes (a write without them clears stale ones, as
  envd does).  Keys are lowercased; keys and values are checked as the SDK
  checks them (HTTP token characters; printable US-ASCII).
* ``Stat``/``ListDir``/``Move`` show a file's ``user.e2b.*`` attributes as
  ``metadata`` (the prefix stripped), including ones set out of band.

Every tier stores them: the workspace is tmpfs on namespaces (user xattrs
since Linux 6.6) and gVisor (its own tmpfs) and ext4 in a microVM.  Where
the filesystem refuses them (``ENOTSUP``), or the policy has no
``python3``, a write with metadata is refused (501, naming the cause) and
the file it wrote is removed: it is never kept without its metadata.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..http._service import ApiError, Entry, SandboxService

PREFIX = "user.e2b."
HEADER = "x-metadata-"
_KEY = re.compile(r"\A[a-z0-9!#$%&'*+\-.^_`|~]+\Z")
_VALUE = re.compile(r"\A[\x20-\x7e]*\Z")
#: Bounds of one file's metadata (headers are bounded by the edge too).
MAX_KEYS = 64
MAX_VALUE = 4096
#: Exit status of the helper when the filesystem has no user xattrs.
_NOTSUP = 3

# argv: metadata as JSON, then the paths.  Replaces user.e2b.* on each path.
_SET = """
import errno, json, os, sys
m = json.loads(sys.argv[1])
for p in sys.argv[2:]:
    try:
        for n in os.listxattr(p):
            if n.startswith("user.e2b."):
                os.removexattr(p, n)
        for k, v in m.items():
            os.setxattr(p, "user.e2b." + k, v.encode())
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            sys.stderr.write(p + ": " + e.strerror + "\\n"); sys.exit(3)
        if m or e.errno != errno.ENOENT:
            sys.stderr.write(p + ": " + e.strerror + "\\n"); sys.exit(1)
"""
# argv: the paths.  Prints one JSON object: path -> {key: value} (non-empty only).
_GET = """
import json, os, sys
out = {}
for p in sys.argv[1:]:
    try:
        m = {}
        for n in os.listxattr(p):
            if n.startswith("user.e2b.") and len(n) > 9:
                m[n[9:]] = os.getxattr(p, n).decode("ascii", "replace")
        if m:
            out[p] = m
    except OSError:
        pass
sys.stdout.write(json.dumps(out))
"""


def from_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The ``X-Metadata-*`` headers as metadata (keys lowercased); 400 naming a
    bad key or value."""
    meta: dict[str, str] = {}
    for name, value in headers.items():
        if not name.lower().startswith(HEADER):
            continue
        key = name.lower()[len(HEADER) :]
        if not _KEY.match(key):
            raise ApiError(400, "invalid", f"metadata key {key!r}: must be an HTTP token")
        if not _VALUE.match(value) or len(value) > MAX_VALUE:
            raise ApiError(
                400,
                "invalid",
                f"metadata {key!r}: the value must be printable US-ASCII, "
                f"at most {MAX_VALUE} characters",
            )
        meta[key] = value
    if len(meta) > MAX_KEYS:
        raise ApiError(400, "invalid", f"metadata: at most {MAX_KEYS} keys")
    return meta


def _python(svc: SandboxService, e: Entry, script: str, args: list[str]) -> Any:
    return svc.run(e, ["python3", "-I", "-S", "-c", script, *args])


def apply(svc: SandboxService, e: Entry, paths: Sequence[str], meta: dict[str, str]) -> None:
    """Make ``meta`` the ``user.e2b.*`` attributes of each of ``paths`` (just
    written).  Without ``meta`` a failure is ignored: there was nothing to
    keep.  With it, 501 when the sandbox cannot store it."""
    if not paths:
        return
    r = _python(svc, e, _SET, [json.dumps(meta), *paths])
    if r.exit_code == 0 or not meta:
        return
    if r.exit_code in (126, 127):
        why = "the sandbox's policy does not allow python3, which stores it"
    elif r.exit_code == _NOTSUP:
        why = "the sandbox's filesystem does not store extended attributes"
    else:
        why = (r.stderr.strip() or "the sandbox could not store it")[:300]
    raise ApiError(501, "unimplemented", f"file metadata: {why}")


def read(svc: SandboxService, e: Entry, paths: Sequence[str]) -> dict[str, dict[str, str]]:
    """The ``user.e2b.*`` attributes of ``paths`` (those that have some); none
    where the sandbox cannot tell (no python3 in the policy)."""
    if not paths:
        return {}
    r = _python(svc, e, _GET, list(paths))
    if r.exit_code != 0 or r.truncated:
        return {}
    try:
        got = json.loads(r.stdout)
    except ValueError:
        return {}
    if not isinstance(got, dict):
        return {}
    return {
        p: {k: v for k, v in m.items() if isinstance(k, str) and isinstance(v, str)}
        for p, m in got.items()
        if isinstance(p, str) and isinstance(m, dict)
    }
