"""Which optional extra provides a missing module, so the error says what to install.

``glassroom serve``, ``glassroom mcp`` and the SDK's remote mode need the
``serve`` extra.  Without it, Python's own message (``No module named
'fastapi'``) names a module the user never asked for; the message built here
names the extra and the command that installs it.
"""

from __future__ import annotations

from ._errors import BackendUnavailable

#: Top-level module -> the extra of glassroom that installs it.
EXTRA_OF_MODULE: dict[str, str] = {
    "fastapi": "serve",
    "starlette": "serve",
    "uvicorn": "serve",
    "httpx": "serve",
    "multipart": "serve",
    "python_multipart": "serve",
    "mcp": "serve",
}


def missing_extra(exc: BaseException, what: str) -> BackendUnavailable | None:
    """A clear error for ``exc`` if it is a module of an extra, else None."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    extra = EXTRA_OF_MODULE.get(exc.name.partition(".")[0])
    if extra is None:
        return None
    return BackendUnavailable(
        f"{what} needs the '{extra}' extra (missing module {exc.name!r}): "
        f"pip install 'glassroom[{extra}]'"
    )
