"""The pages an app serves about its API (FastAPI's ``/docs``, ``/redoc``,
``/openapi.json``): readable without a key, and documenting the library's answers.

Without this, the README's FastAPI app answers its own documentation with 401. With
``KeystileMiddleware(public_docs=True)`` (the default), a request *without* a key for one of
those pages goes through anonymously; a request with a key is authenticated as usual. The
pages are learnt from the app itself (``docs_url`` and its siblings) when it starts, or on
the first request without a key; and the app's OpenAPI document gains the 401, 403 and 429
answers of every operation that needs a key (:func:`keystile.fastapi.document_errors`).
"""

from __future__ import annotations

from typing import Any

from starlette.types import Scope

from keystile.routing import route_path

__all__ = ["AppDocs"]

_DOC_URLS = ("openapi_url", "docs_url", "redoc_url", "swagger_ui_oauth2_redirect_url")


class AppDocs:
    """The documentation pages of the app behind one middleware."""

    __slots__ = ("paths", "public")

    def __init__(self, *, public: bool = True) -> None:
        self.public = public
        self.paths: frozenset[str] | None = None  # None until the app is known

    def asked(self, scope: Scope) -> bool:
        """Whether a request (without a key) asks for a public documentation page."""
        if not self.public or scope.get("method") not in ("GET", "HEAD"):
            return False
        if self.paths is None:
            self.discover(scope.get("app"))
        return route_path(scope) in (self.paths or ())

    def discover(self, app: Any) -> None:
        """Learn ``app``'s documentation pages; a FastAPI app's OpenAPI document learns
        the library's answers."""
        urls = [getattr(app, name, None) for name in _DOC_URLS]
        self.paths = frozenset(u for u in urls if isinstance(u, str) and u.startswith("/"))
        if isinstance(getattr(app, "openapi_url", None), str) and callable(
            getattr(app, "openapi", None)
        ):
            from keystile.fastapi import document_errors  # FastAPI is installed: app is one

            document_errors(app)
