"""The web console of ``glassroom serve`` (``/console``).

Static files only (HTML, CSS, vanilla JS, shipped as package data) plus a
login and a logout: everything the pages show comes from the same ``/v1`` API
the SDK uses.  The login trades a tenant key for a session cookie, which the
``/v1`` tenant dependency accepts (see :func:`session_tenant`); the port
relay never does, so a sandbox's web page cannot borrow the console's authority.
"""

from ._mount import CSRF_COOKIE, CSRF_HEADER, SESSION_COOKIE, Sessions, mount, session_tenant

__all__ = ["CSRF_COOKIE", "CSRF_HEADER", "SESSION_COOKIE", "Sessions", "mount", "session_tenant"]
