"""The interactive API documentation, ``GET /docs`` (Swagger UI) and ``GET /redoc`` (ReDoc), served without internet.

FastAPI's built-in pages load their scripts, styles, fonts and favicon from public CDNs, so they stay blank on a
machine that cannot reach them. These pages reference only this origin: the two UIs are vendored, at pinned versions
and with their licence files, under ``static/vendor/<package>-<version>/`` (provenance and checksums in
``static/vendor/README.md``) and served under ``/static``. Swagger UI's online validator badge is switched off, ReDoc
runs without Google Fonts, and a Content-Security-Policy on the pages keeps the browser on this origin for anything
the bundles would fetch on their own (ReDoc 2's menu footer shows a logo from its vendor's CDN; the policy blocks it
and ReDoc then hides it).

``/static`` is shared: other vendored libraries (a console under ``/ui``) go in their own versioned folders. Files
in a versioned folder never change, so they are cached for a year; any other file is revalidated with its ETag.
"""

from __future__ import annotations

import mimetypes
import os
import re
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.datastructures import Headers
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.staticfiles import NotModifiedResponse, StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_PATH = "/static"
SWAGGER_UI = "vendor/swagger-ui-dist-5.36.0"
REDOC = "vendor/redoc-2.5.4"
FAVICON = f"{SWAGGER_UI}/favicon-32x32.png"
DOCS_PATH = "/docs"
REDOC_PATH = "/redoc"
OAUTH2_REDIRECT_PATH = "/docs/oauth2-redirect"

IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "public, no-cache"
VERSIONED = re.compile(r"^vendor/[^/]+-\d+\.\d+\.\d+[^/]*/")  # vendor/<package>-<version>/...
MEDIA_TYPES = {  # fixed here: mimetypes reads the host's /etc/mime.types, which differs between machines
    ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".map": "application/json",
    ".json": "application/json", ".html": "text/html", ".txt": "text/plain", ".md": "text/markdown",
    ".png": "image/png", ".svg": "image/svg+xml", ".ico": "image/x-icon", ".woff2": "font/woff2",
    ".woff": "font/woff",
}
# Only this origin, plus data:/blob: URLs the bundles build themselves. 'unsafe-inline' scripts: FastAPI's page
# calls SwaggerUIBundle(...) inline; inline styles: both UIs inject <style> elements; blob: workers: ReDoc's search.
PAGE_POLICY = "; ".join((
    "default-src 'self'",
    "script-src 'self' 'unsafe-inline'",
    "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data: blob:",
    "font-src 'self' data:",
    "worker-src 'self' blob:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'self'",
    "form-action 'self'",
    "frame-ancestors 'self'",
))


def media_type_of(path: str) -> str:
    """The Content-Type of a static file: by extension; licence and notice files without one are text."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in MEDIA_TYPES:
        return MEDIA_TYPES[suffix]
    if not suffix:
        return "text/plain"
    return mimetypes.guess_type(path)[0] or "application/octet-stream"


def cache_control_of(path: str) -> str:
    """``path`` is relative to the static folder (``vendor/redoc-2.5.4/redoc.standalone.js``)."""
    return IMMUTABLE if VERSIONED.match(path.replace(os.sep, "/")) else REVALIDATE


class StaticAssets(StaticFiles):
    """StaticFiles (ETag, Last-Modified, 304, HEAD, ranges) with fixed content types, Cache-Control and nosniff."""

    def file_response(self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:
        relative = self.get_path(scope)
        response = FileResponse(full_path, status_code=status_code, stat_result=stat_result,
                                media_type=media_type_of(relative))
        response.headers["Cache-Control"] = cache_control_of(relative)
        response.headers["X-Content-Type-Options"] = "nosniff"
        if self.is_not_modified(response.headers, Headers(scope=scope)):
            return NotModifiedResponse(response.headers)  # keeps Cache-Control and ETag
        return response


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def _static(request: Request, path: str) -> str:
    return f"{_root(request)}{STATIC_PATH}/{path}"


def _openapi_url(request: Request) -> str:
    openapi_url = request.app.openapi_url
    if not openapi_url:
        raise HTTPException(404)
    return f"{_root(request)}{openapi_url}"


def _confined(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = PAGE_POLICY
    page.headers["X-Content-Type-Options"] = "nosniff"
    return page


async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI over ``/openapi.json``."""
    parameters = {**(request.app.swagger_ui_parameters or {}),
                  "validatorUrl": None}  # else a badge image is loaded from validator.swagger.io
    return _confined(get_swagger_ui_html(
        openapi_url=_openapi_url(request), title=f"{request.app.title} - Swagger UI",
        swagger_js_url=_static(request, f"{SWAGGER_UI}/swagger-ui-bundle.js"),
        swagger_css_url=_static(request, f"{SWAGGER_UI}/swagger-ui.css"),
        swagger_favicon_url=_static(request, FAVICON),
        oauth2_redirect_url=f"{_root(request)}{OAUTH2_REDIRECT_PATH}",
        init_oauth=request.app.swagger_ui_init_oauth, swagger_ui_parameters=parameters))


async def swagger_ui_oauth2_redirect(request: Request) -> HTMLResponse:
    """Where an OAuth2 provider returns to Swagger UI's "Authorize" dialog (FastAPI's page; inline script only)."""
    return _confined(get_swagger_ui_oauth2_redirect_html())


async def redoc(request: Request) -> HTMLResponse:
    """ReDoc over ``/openapi.json``."""
    return _confined(get_redoc_html(
        openapi_url=_openapi_url(request), title=f"{request.app.title} - ReDoc",
        redoc_js_url=_static(request, f"{REDOC}/redoc.standalone.js"), redoc_favicon_url=_static(request, FAVICON),
        with_google_fonts=False))


router = APIRouter()
router.add_route(DOCS_PATH, swagger_ui, include_in_schema=False)  # plain routes: GET and HEAD, as FastAPI's own
router.add_route(OAUTH2_REDIRECT_PATH, swagger_ui_oauth2_redirect, include_in_schema=False)
router.add_route(REDOC_PATH, redoc, include_in_schema=False)
router.mount(STATIC_PATH, StaticAssets(directory=STATIC_DIR), name="static")
