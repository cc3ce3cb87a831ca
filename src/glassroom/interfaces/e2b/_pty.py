"""envd's PTYs: ``Start`` with ``pty``, ``SendInput`` with ``pty`` bytes, ``Update``.

The E2B SDK's ``sandbox.pty`` starts ``/bin/bash -i -l`` with a ``pty`` field
(``size``: rows and cols), types into it with ``SendInput`` (``input.pty``),
resizes it with ``Update`` and reads it from ``Start``/``Connect`` events whose
data is ``pty`` instead of ``stdout``/``stderr``.  Here the terminal is a real
one, made inside the sandbox by the tier's own init (``Sandbox.spawn(pty=)``):
its command runs under the same walls as any command, so a terminal can do
nothing a plain command cannot.  Output events come from the backend as
``"pty"`` already, so ``_envd``'s stream needs no change for them.

Message shapes follow e2b-dev/infra ``packages/envd/spec/process``; errors are
``RpcError`` (imported lazily from ``_envd``, which imports this module).
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from ..._errors import SandboxError
from ...backends.base import MAX_PTY_SIDE

if TYPE_CHECKING:
    from ...backends.base import Process


def _rpc_error(code: str, message: str) -> Exception:
    from ._envd import RpcError

    return RpcError(code, message)


def _side(size: dict[str, Any], name: str, where: str) -> int:
    value = size.get(name)
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 6:
        value = int(value)  # protobuf's JSON mapping may send an integer as a string
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_PTY_SIDE:
        raise _rpc_error(
            "invalid_argument", f"{where}.size.{name}: must be an integer from 1 to {MAX_PTY_SIDE}"
        )
    return value


def pty_size(msg: dict[str, Any], where: str = "pty") -> tuple[int, int] | None:
    """``(rows, cols)`` from a request's ``pty`` field; None when there is none.
    A ``pty`` without a usable size is ``invalid_argument`` (envd needs both)."""
    pty = msg.get("pty")
    if pty is None:
        return None
    if not isinstance(pty, dict):
        raise _rpc_error("invalid_argument", f"{where}: must be an object")
    size = pty.get("size")
    if not isinstance(size, dict):
        raise _rpc_error("invalid_argument", f"{where}.size: rows and cols are required")
    return _side(size, "rows", where), _side(size, "cols", where)


def send_input(proc: Process, data_b64: object) -> None:
    """``SendInput`` with ``input.pty``: the bytes are typed into the terminal."""
    if not _has_pty(proc):
        raise _rpc_error("failed_precondition", f"process {proc.pid} has no pty: send stdin")
    if not isinstance(data_b64, str):
        raise _rpc_error("invalid_argument", "input.pty: must be base64")
    try:
        data = base64.b64decode(data_b64, validate=True)
    except ValueError:
        raise _rpc_error("invalid_argument", "input.pty: must be base64") from None
    try:
        proc.write_stdin(data)
    except OSError as exc:
        raise _rpc_error("failed_precondition", f"pty: {exc}") from None


def update(proc: Process, msg: dict[str, Any]) -> dict[str, Any]:
    """``Update``: a new size for the process's terminal (``TIOCSWINSZ`` inside)."""
    size = pty_size(msg)
    if size is None:
        return {}  # nothing to change (envd's Update has only the pty)
    if not _has_pty(proc):
        raise _rpc_error("failed_precondition", f"process {proc.pid} has no pty to resize")
    try:
        proc.resize(*size)
    except SandboxError as exc:
        raise _rpc_error("failed_precondition", exc.message) from None
    return {}


def _has_pty(proc: Process) -> bool:
    req = getattr(proc, "req", None)
    return getattr(req, "pty", None) is not None
