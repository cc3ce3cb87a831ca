"""``glassroom serve``: the own HTTP API (``/v1``) and the E2B-compatible API.

``create_app(cfg)`` is the ASGI app; ``serve(cfg)`` runs it with uvicorn.
"""

from __future__ import annotations

from ._app import create_app, openapi_spec
from ._config import ServeConfig, Tenant, hash_key, new_key
from ._service import ApiError, SandboxService


def serve(cfg: ServeConfig) -> None:
    """Run the server until SIGTERM/SIGINT; it stops within ``cfg.shutdown_timeout_s``."""
    from ._serve import run

    run(cfg)


__all__ = [
    "ApiError",
    "SandboxService",
    "ServeConfig",
    "Tenant",
    "create_app",
    "hash_key",
    "new_key",
    "openapi_spec",
    "serve",
]
