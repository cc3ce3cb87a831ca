"""Templates: a sandbox's own software environment, as a read-only root filesystem.

``TemplateStore`` keeps them content-addressed (``_store``); ``import_oci``
makes one from an OCI image layout or a ``docker save`` tar (``_oci``).
See docs/templates.md for what is built so far and what is not.
"""

from ._oci import import_oci
from ._store import Template, TemplateMeta, TemplateStore, tree_digest

__all__ = ["Template", "TemplateMeta", "TemplateStore", "import_oci", "tree_digest"]
