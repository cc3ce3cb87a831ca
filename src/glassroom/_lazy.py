"""Lazy re-exports for package ``__init__`` modules (PEP 562).

Why: ``glassroom run -- true`` is a whole process, and importing every public
name eagerly (pydantic models, the egress proxy, ``cryptography``'s X.509)
cost far more than the sandbox itself.  A package lists where each public
name lives; the module is imported on first attribute access and the name
is then cached in the package's namespace, so later lookups are plain dict
hits.  Type checkers see the real imports under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def exports(
    package: str, where: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, whose names live in ``where``
    (name -> module relative to the package, e.g. ``"._sandbox"``)."""

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace = importlib.import_module(package).__dict__
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(importlib.import_module(package).__dict__) | set(where))

    return __getattr__, __dir__
