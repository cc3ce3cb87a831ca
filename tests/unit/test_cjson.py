"""The guest's light ``json`` (``guest/cjson.py``) against the real one.

It replaces ``json`` in the guest agent, which parses every frame the host
sends and builds every frame the host reads; it must agree with ``json`` on
what glassroom sends, and refuse what ``json`` refuses."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from glassroom.guest import cjson

GUEST = Path(cjson.__file__).parent


def _value(rng: random.Random, depth: int = 0) -> object:
    kinds = ["int", "float", "str", "bool", "none"] + (["list", "dict"] if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(-(2**70), 2**70)
    if kind == "float":
        return rng.choice([0.0, -1.5, 1e300, 3.141592653589793, rng.random()])
    if kind == "str":
        alphabet = "aZ09 \"\\/\n\t\x00\x1f\u00e9\u2028\U0001f600"
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "list":
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return {str(_value(rng, 9)): _value(rng, depth + 1) for _ in range(rng.randint(0, 5))}


@pytest.mark.parametrize("kw", [{}, {"separators": (",", ":")}, {"ensure_ascii": False},
                                {"separators": (",", ":"), "ensure_ascii": False}])  # fmt: skip
def test_dumps_and_loads_agree_with_json(kw: dict[str, object]) -> None:
    rng = random.Random(7)
    for _ in range(300):
        v = _value(rng)
        text = json.dumps(v, **kw)  # type: ignore[arg-type]
        assert cjson.dumps(v, **kw) == text  # type: ignore[arg-type]
        assert cjson.loads(text) == json.loads(text)
        assert cjson.loads(text.encode()) == json.loads(text.encode())


@pytest.mark.parametrize("bad", ["", "  ", "{", "[1,]", '{"a":1} x', "nul", '"\\x"',
                                 '{"a" 1}', "[" * 100_000, "\ufeff{}"])  # fmt: skip
def test_what_json_refuses_is_refused(bad: str) -> None:
    with pytest.raises((ValueError, RecursionError)):
        json.loads(bad)
    with pytest.raises((ValueError, RecursionError)):
        cjson.loads(bad)


def test_unencodable_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        cjson.dumps({"a": object()})


def test_as_the_guest_installs_it() -> None:
    """As ``/.glassroom/init`` does: no ``re``/``enum``, the protocol works, errors too."""
    prog = (
        "import sys\n"
        f"sys.path.insert(0, {str(GUEST)!r})\n"
        "import cjson\n"
        "sys.modules['json'] = cjson\n"
        "import protocol\n"
        "frame = protocol.encode({'op': 'hello', 'version': protocol.VERSION, 's': '\\u00e9'})\n"
        "print(protocol.Decoder().feed(frame)[0][0]['s'])\n"
        "print(sorted(m for m in ('re', 'enum') if m in sys.modules))\n"
        "try:\n"
        "    cjson.loads('\"\\\\x\"')\n"
        "except ValueError as exc:\n"
        "    print(type(exc).__name__)\n"
    )
    r = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", prog], capture_output=True,
                       text=True, timeout=60, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["\u00e9", "[]", "JSONDecodeError"]


def test_a_failed_dumps_leaves_nothing_behind() -> None:
    """After a TypeError midway, the same containers encode again (no false
    "Circular reference detected" from a reused marker table)."""
    items: list[object] = [object()]
    with pytest.raises(TypeError):
        cjson.dumps({"items": items})
    items[0] = 1  # fixed: now it must encode like json does
    assert cjson.dumps({"items": items}) == json.dumps({"items": items}) == '{"items": [1]}'
