"""``python -m glassroom.interfaces.http [FILE]``: write the own API's OpenAPI spec
(default ``docs/openapi.json``; tests/interfaces/test_openapi.py checks it is current)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ._app import openapi_spec


def render() -> str:
    return json.dumps(openapi_spec(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/openapi.json")
    out.write_text(render())
    print(f"wrote {out}")
