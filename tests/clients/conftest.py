"""Fixtures for the client tests: real agent frameworks (smolagents, openai-agents),
unmodified, against a real ``glassroom serve`` on 127.0.0.1 (see
tests/interfaces/serve_helpers.py).  Their models are scripted, so no test
reaches a network: the LLM is not under test, the framework's sandbox is."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="glassroom[serve] is not installed")

#: The tier each backend's serve template asks for (a policy's ``risk``).
RISK = {"namespaces": "low", "gvisor": "medium", "microvm": "high"}


def need_store_template(name: str) -> None:
    """Skip (a failure under CI=true, see tests/conftest.py) unless the store
    holds template ``name``: the built-in ones are where scripts/setup.sh built
    them, the store the session's conftest points ``GLASSROOM_TEMPLATE_DIR`` at
    (serve reads the same)."""
    from glassroom._config import template_dir
    from glassroom._errors import TemplateError
    from glassroom.templates import TemplateStore

    root = template_dir()
    try:
        TemplateStore(root).get(name)
    except (TemplateError, OSError) as exc:
        pytest.skip(
            f"the built-in template {name!r} is not in the store {root} ({exc}); "
            f"build it with `glassroom template builtin {name}` (scripts/setup.sh does)"
        )
