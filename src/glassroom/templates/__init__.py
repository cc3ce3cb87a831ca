"""Templates: a sandbox's own software environment, as a read-only root filesystem.

``TemplateStore`` keeps them content-addressed (``_store``); ``import_oci``
makes one from an OCI image layout or a ``docker save`` tar (``_oci``);
``build`` makes one from a recipe (``_recipe``, ``_build``).
See docs/templates.md for what is built so far and what is not.
"""

from ._build import build
from ._builtin import BUILTINS, ensure
from ._oci import import_oci
from ._recipe import Recipe, load_recipe
from ._store import Template, TemplateMeta, TemplateStore, tree_digest

__all__ = ["BUILTINS", "Recipe", "Template", "TemplateMeta", "TemplateStore", "build", "ensure",
           "import_oci", "load_recipe", "tree_digest"]
