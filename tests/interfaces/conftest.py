"""Fixtures for the interface tests: ``serve``, a real ``glassroom serve`` on
127.0.0.1 for one test module (see serve_helpers.py), with the E2B SDKs pointed
at it the documented way (``E2B_API_URL`` / ``E2B_SANDBOX_URL`` / ``E2B_API_KEY``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="glassroom[serve] is not installed")

from .serve_helpers import Server, serving_e2b


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving_e2b(tmp_path_factory.mktemp("serve")) as srv:
        yield srv


@pytest.fixture
def sbx(serve: Server) -> Iterator[Any]:
    """A sandbox of ``serve`` made with the E2B SDK (``e2b.Sandbox``), killed after."""
    e2b = pytest.importorskip("e2b")
    sb = e2b.Sandbox.create(timeout=120)
    yield sb
    try:
        sb.kill()
    except Exception:
        pass
