"""The built-in templates, ``base`` and ``code-interpreter`` (recipes in ``builtin/``).

``ensure`` builds each one that the store lacks, or holds from another
recipe (a template's metadata keeps its recipe's sha256), so running it again
is a no-op and an edited recipe is rebuilt.  ``scripts/setup.sh`` runs it
through ``glassroom template builtin``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .._errors import TemplateError
from ._build import build
from ._recipe import load_recipe
from ._store import Template, TemplateStore

BUILTIN_DIR = Path(__file__).with_name("builtin")
BUILTINS = ("base", "code-interpreter")


def recipe_path(name: str) -> Path:
    if name not in BUILTINS:
        raise TemplateError(
            f"{name!r} is not a built-in template (built-ins: {', '.join(BUILTINS)})",
            rule="template",
        )
    return BUILTIN_DIR / f"{name}.toml"


def current(store: TemplateStore, name: str) -> Template | None:
    """``name`` in the store, if it was built from today's built-in recipe."""
    want = load_recipe(recipe_path(name)).digest
    try:
        t = store.get(name)
    except TemplateError:
        return None
    return t if t.meta.source.get("recipe_digest") == want else None


def ensure(
    store: TemplateStore,
    names: tuple[str, ...] = BUILTINS,
    *,
    rebuild: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[tuple[Template, bool]]:
    """Each built-in of ``names``, built unless current: [(template, built)]."""
    out = []
    for name in names:
        t = None if rebuild else current(store, name)
        if t is None:
            t = build(load_recipe(recipe_path(name)), store, name, progress=progress)
            out.append((t, True))
        else:
            out.append((t, False))
    return out
