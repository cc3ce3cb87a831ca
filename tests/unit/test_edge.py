"""The edge of ``glassroom serve`` without a server: strict JSON, bounded
decoding, the family of a path.  (The served behaviour is in
tests/interfaces/test_abuse.py.)"""

from __future__ import annotations

import gzip
import zlib

import pytest

pytest.importorskip("fastapi", reason="glassroom[serve] is not installed")

from glassroom.interfaces.http import ApiError
from glassroom.interfaces.http._edge import (
    MAX_JSON_DEPTH,
    Family,
    _inflate,
    connect_message,
    family_of,
    strict_json,
)
from glassroom.interfaces.http._service import check_mapping, check_timeout


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (b'{"timeout": NaN}', "body.timeout: NaN is not a JSON number"),
        (b'{"a": [1, Infinity]}', "body.a[1]: Infinity"),
        (b"-Infinity", "body: -Infinity"),
        (b'{"t": 1e400}', "body.t: the number 1e400 is out of range"),
        (b'{"t": 1' + b"0" * 25 + b"}", "body.t: an integer of 26 digits"),
        (b'{"m": {"k": "\\ud800"}}', "body.m.k: a lone UTF-16 surrogate"),
        (b'{"\\udfff": 1}', "(a key)"),
        (b'{"a b": "\\udc80"}', "body['a b']"),
        (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), "nested deeper"),
        (b"[" * 100_000, "nested deeper"),
        (b'{"a": ', "body is not JSON"),
        (b"\xff\xfe\xfd", "not valid UTF-8"),
    ],
)
def test_strict_json_refuses_and_says_where(text: bytes, words: str) -> None:
    with pytest.raises(ApiError) as ei:
        strict_json(text)
    assert ei.value.status == 400
    assert words in ei.value.message, ei.value.message


def test_strict_json_accepts_json() -> None:
    ok = b'{"a": [1, 2.5, -3, "\\u00e9\\ud83d\\ude00", null, true], "b": {"c": 10000000000}}'
    assert strict_json(ok) == {"a": [1, 2.5, -3, "é😀", None, True], "b": {"c": 10**10}}
    deep = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert strict_json(deep)  # exactly the limit is fine


def test_inflate_is_bounded_and_strict() -> None:
    bomb = gzip.compress(b"\0" * (8 << 20))
    with pytest.raises(ApiError) as ei:
        _inflate(bomb, "gzip", 1 << 20)
    assert ei.value.status == 413 and ei.value.rule == "serve.max_request_bytes"
    assert _inflate(gzip.compress(b"a") + gzip.compress(b"b"), "gzip", 10) == b"ab"
    assert _inflate(zlib.compress(b"raw"), "deflate", 10) == b"raw"
    assert _inflate(zlib.compress(b"raw")[2:-4], "deflate", 10) == b"raw"
    for bad in (b"nope", gzip.compress(b"x" * 100)[:-10]):
        with pytest.raises(ApiError) as ei:
            _inflate(bad, "gzip", 1000)
        assert ei.value.status == 400


def test_connect_envelope() -> None:
    assert connect_message(b"\0\0\0\0\x02{}") == {}
    for bad, words in [
        (b"\0\0", "missing"),
        (b"\0\0\0\0\x09{}", "says 9 bytes"),
        (b"\x01\0\0\0\x02{}", "compressed"),
        (b"\0\0\0\0\x02[]", "not a JSON object"),
    ]:
        with pytest.raises(ApiError) as ei:
            connect_message(bad)
        assert words in ei.value.message


def test_family_of() -> None:
    assert family_of("/v1/sandboxes") is Family.OWN
    assert family_of("/sandboxes/x/timeout") is Family.CONTROL
    assert family_of("/v2/sandboxes") is Family.CONTROL
    assert family_of("/process.Process/Start") is Family.CONNECT
    assert family_of("/no.Such/Thing") is Family.CONNECT
    assert family_of("/files") is Family.ENVD
    assert family_of("/execute") is Family.INTERPRETER
    assert family_of("/x", {"e2b-sandbox-port": "49999"}) is Family.INTERPRETER
    assert family_of("/x", {"e2b-sandbox-id": "sb"}) is Family.ENVD
    assert family_of("/anything") is Family.CONTROL


def test_field_checks() -> None:
    for bad in (float("nan"), float("inf"), 0, -1, True, "10", None, 10**400, 1e300):
        with pytest.raises(ApiError) as ei:
            check_timeout(bad, "timeout")
        assert ei.value.message.startswith("timeout: ")
    assert check_timeout(30, "timeout") == 30.0
    assert check_mapping({"A": "1"}, "env", env=True) == {"A": "1"}
    for bad_env in ({"A=B": "1"}, {"": "1"}, {"A": "x\0y"}, {"A": 1}, ["A"]):
        with pytest.raises(ApiError):
            check_mapping(bad_env, "env", env=True)
    with pytest.raises(ApiError) as ei:
        check_mapping({"k": "\udc80"}, "metadata")
    assert "surrogate" in ei.value.message
