"""The guest's ``json``: the stdlib's own C codec, without the ``json`` package.

Why: importing ``json`` imports ``re``, and with it ``enum`` and
``functools``; under TCG that is about 0.15 s of a 1.5 s cold boot, spent
before the agent can answer.  ``/.glassroom/init`` installs this module as
``sys.modules["json"]`` before the agent (and ``protocol.py`` and
``tracer.py``, which the host shares) are imported.

It is the same C scanner and encoder that ``json.loads``/``json.dumps`` use,
with the same defaults, for the calls glassroom makes: ``dumps(obj, *,
separators=None, ensure_ascii=True)`` and ``loads(s)``, nothing else.  On a
malformed document the C scanner imports ``json.decoder`` for its error
class: that comes from the real package, found through ``__path__``.  If
``_json`` is missing (not CPython), the launcher keeps the real ``json``.

Stdlib only, no glassroom import: copied into the guest.  The unit tests
check it against ``json`` on the same inputs.
"""

import _json
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: Submodules (``json.decoder`` on an error path) load from the real package.
__path__ = [os.path.join(os.path.dirname(os.__file__), "json")]

_WS = " \t\n\r"
_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _Context:
    """The attributes ``_json.make_scanner`` reads (as ``json.JSONDecoder`` has them)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


_scan = _json.make_scanner(_Context())  # type: ignore[arg-type]


def _default(o: object) -> object:
    raise TypeError(f"Object of type {o.__class__.__name__} is not JSON serializable")


def dumps(obj: object, *, separators: "tuple[str, str] | None" = None,
          ensure_ascii: bool = True) -> str:  # fmt: skip
    item_sep, key_sep = separators or (", ", ": ")
    encode_str = _json.encode_basestring_ascii if ensure_ascii else _json.encode_basestring
    # A new encoder per call, as json.dumps makes: its ``markers`` dict (the
    # circular-reference check) must not outlive a call that failed midway.
    # (markers, default, encoder, indent, key_separator, item_separator,
    #  sort_keys, skipkeys, allow_nan): json.dumps' defaults.
    enc = _json.make_encoder({}, _default, encode_str, None, key_sep, item_sep,
                             False, False, True)  # fmt: skip
    return "".join(enc(obj, 0))


def loads(s: "str | bytes | bytearray") -> "Any":
    if isinstance(s, (bytes, bytearray)):
        s = s.decode("utf-8")  # json.loads also detects UTF-16/32; the protocol is UTF-8
    start = len(s) - len(s.lstrip(_WS))
    try:
        obj, end = _scan(s, start)
    except StopIteration as exc:
        raise ValueError(f"Expecting value: char {exc.value}") from None
    except SystemError:
        # CPython 3.11's scanner reports a malformed string through
        # json.decoder.JSONDecodeError, which it looks up in sys.modules only
        # and fails without it: load it (an error path) and scan again.
        import json.decoder  # noqa: F401

        obj, end = _scan(s, start)  # raises the JSONDecodeError (a ValueError)
    if s[end:].strip(_WS):
        raise ValueError(f"Extra data: char {end}")
    return obj

