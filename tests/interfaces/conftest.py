"""Fixtures for the interface tests: ``serve``, a real ``glassroom serve`` on
127.0.0.1 for one test module (see serve_helpers.py), with the E2B SDKs pointed
at it the documented way (``E2B_API_URL`` / ``E2B_SANDBOX_URL`` / ``E2B_API_KEY``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="glassroom[serve] is not installed")

from .serve_helpers import Server, start_server


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("serve")
    srv, server, th = start_server(data)
    saved = {
        k: os.environ.get(k)
        for k in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY", "E2B_DOMAIN")
    }
    os.environ.update(E2B_API_URL=srv.url, E2B_SANDBOX_URL=srv.url, E2B_API_KEY=srv.keys["alice"])
    try:
        yield srv
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.should_exit = True
        th.join(20)
        srv.service.close()


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
