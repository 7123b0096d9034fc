"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) work without internet: their HTML, inline scripts and styles, and the
stylesheets they load (recursively) reference only the gateway's own origin, and every referenced asset is served
with the right content type and caching headers. The vendored files are the ones ``static/vendor/README.md``
records (checksums), each folder with its licence.

The gateway is served over real HTTP without NATS or PostgreSQL (lifespan off): these pages need neither."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import PurePosixPath
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from langorch_gateway.app import create_app
from langorch_gateway.routes_api_docs import STATIC_DIR
from langorch_infra.settings import GatewaySettings
from tests.helpers import serve_app

pytestmark = pytest.mark.unit

PAGES = ("/docs", "/redoc")
URL_ATTRIBUTES = {"src", "href", "srcset", "action", "formaction", "data", "poster", "background", "manifest",
                  "xlink:href"}
# string literals in inline scripts that are URLs: absolute, protocol-relative, or root-relative paths
SCRIPT_URL = re.compile(r"""(["'`])((?:[A-Za-z][A-Za-z0-9+.-]*:)?//[^"'`\s]*|/[^/"'`\s][^"'`\s]*)\1""")
CSS_URL = re.compile(r"""url\(\s*(["']?)(.*?)\1\s*\)|@import\s+(["'])(.*?)\3""", re.S)
EXTENSION_TYPES = {".js": ("text/javascript", "application/javascript"), ".css": ("text/css",),
                   ".json": ("application/json",), ".png": ("image/png",), ".svg": ("image/svg+xml",),
                   ".ico": ("image/x-icon", "image/vnd.microsoft.icon"), ".woff2": ("font/woff2",),
                   ".woff": ("font/woff",), ".gif": ("image/gif",), ".jpg": ("image/jpeg",)}


@dataclass(frozen=True)
class Ref:
    url: str  # as written
    where: str  # what referenced it, for the failure message
    kind: str  # script | stylesheet | icon | other


class References(HTMLParser):
    """Every URL an HTML page names: URL attributes (and any ``*-url`` one, like ReDoc's ``spec-url``), string
    literals in inline scripts, and ``url(...)``/``@import`` in inline styles and style attributes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.refs: list[Ref] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        rel = values.get("rel", "").lower().split()
        for name, value in values.items():
            if name == "style":
                self.refs.extend(Ref(u, f"<{tag} style>", "other") for u in css_urls(value))
            elif name in URL_ATTRIBUTES or name.endswith("url"):
                urls = [part.split()[0] for part in value.split(",") if part.strip()] if name == "srcset" else [
                    value]
                kind = ("script" if tag == "script" else "stylesheet" if "stylesheet" in rel
                        else "icon" if "icon" in rel else "other")
                self.refs.extend(Ref(u, f"<{tag} {name}>", kind) for u in urls)
        refresh = re.search(r"url\s*=\s*(\S+)", values.get("content", ""), re.I)
        if tag == "meta" and values.get("http-equiv", "").lower() == "refresh" and refresh:
            self.refs.append(Ref(refresh.group(1), "<meta refresh>", "other"))
        if tag in ("script", "style"):
            self._in = tag

    def handle_endtag(self, tag: str) -> None:
        if tag == self._in:
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "script":
            self.refs.extend(Ref(m.group(2), "inline <script>", "other") for m in SCRIPT_URL.finditer(data))
        elif self._in == "style":
            self.refs.extend(Ref(u, "inline <style>", "other") for u in css_urls(data))


def css_urls(css: str) -> list[str]:
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.S)  # comments (e.g. sourceMappingURL) are never fetched
    return [(m.group(2) if m.group(2) is not None else m.group(4)).strip() for m in CSS_URL.finditer(css)]


def foreign(ref: str, base: str) -> bool:
    """Whether the browser would fetch ``ref`` (found on ``base``) from anywhere but the page's own origin."""
    if ref.startswith("//"):
        return True  # protocol-relative: always names a host
    if ref.lower().startswith(("data:", "blob:", "#")):
        return False
    target, origin = urlsplit(urljoin(base, ref)), urlsplit(base)
    return (target.scheme, target.netloc) != (origin.scheme, origin.netloc)


def expected_types(ref: Ref, path: str) -> tuple[str, ...]:
    if ref.kind == "script":
        return EXTENSION_TYPES[".js"]
    if ref.kind == "stylesheet":
        return EXTENSION_TYPES[".css"]
    suffix = PurePosixPath(path).suffix.lower()
    if ref.kind == "icon":
        return EXTENSION_TYPES.get(suffix, ("image/",))
    return EXTENSION_TYPES.get(suffix, ("text/html",))  # an extensionless path is a page (/docs/oauth2-redirect)


@pytest.fixture(scope="module")
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with serve_app(create_app(GatewaySettings())) as base, httpx.AsyncClient(base_url=base,
                                                                                   timeout=30) as c:
        yield c


async def page_refs(client: httpx.AsyncClient, path: str) -> tuple[str, list[Ref]]:
    r = await client.get(path)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    parser = References()
    parser.feed(r.text)
    parser.close()
    return str(r.url), parser.refs


@pytest.mark.parametrize("path", PAGES)
async def test_page_references_only_its_own_origin(client: httpx.AsyncClient, path: str) -> None:
    page, refs = await page_refs(client, path)
    kinds = {ref.kind for ref in refs}
    assert {"script", "icon"} <= kinds, refs  # the parser did see the page's assets
    assert [ref for ref in refs if foreign(ref.url, page)] == []
    assert "/openapi.json" in {ref.url for ref in refs}


@pytest.mark.parametrize("path", PAGES)
async def test_every_asset_is_served_with_its_type_and_caching(client: httpx.AsyncClient, path: str) -> None:
    page, refs = await page_refs(client, path)
    queue: list[tuple[str, Ref]] = [(page, ref) for ref in refs]
    seen: set[str] = set()
    while queue:
        base, ref = queue.pop()
        if ref.url.lower().startswith(("data:", "blob:", "#")):
            continue
        assert not foreign(ref.url, base), (ref, base)
        url = urljoin(base, ref.url).split("#")[0]
        if url in seen:
            continue
        seen.add(url)
        r = await client.get(url)
        assert r.status_code == 200, (ref, base, r.status_code)
        ctype = r.headers["content-type"].split(";")[0].strip()
        assert ctype.startswith(expected_types(ref, urlsplit(url).path)), (ref, ctype)
        if ctype == "text/css":  # what a stylesheet loads, recursively
            queue.extend((url, Ref(u, f"url() in {url}", "other")) for u in css_urls(r.text))
        if urlsplit(url).path.startswith("/static/"):
            assert r.headers["x-content-type-options"] == "nosniff"
            assert "public" in r.headers["cache-control"], url
            assert "max-age=" in r.headers["cache-control"], url
            etag = r.headers["etag"]
            again = await client.get(url, headers={"If-None-Match": etag})
            assert again.status_code == 304, url
            assert again.headers["cache-control"] == r.headers["cache-control"]
    assert any("/static/vendor/" in u for u in seen)


async def test_swagger_ui_validator_badge_is_off(client: httpx.AsyncClient) -> None:
    """Swagger UI's default validatorUrl loads a badge image from validator.swagger.io."""
    html = (await client.get("/docs")).text
    assert '"validatorUrl": null' in html
    assert "fonts.googleapis" not in (await client.get("/redoc")).text


@pytest.mark.parametrize("path", [*PAGES, "/docs/oauth2-redirect"])
async def test_pages_confine_the_browser_to_this_origin(client: httpx.AsyncClient, path: str) -> None:
    """A CSP whose every source is 'self', a keyword or data:/blob: (ReDoc's footer logo is on its vendor's CDN)."""
    r = await client.get(path)
    assert r.status_code == 200
    policy = {d.split()[0]: d.split()[1:] for d in r.headers["content-security-policy"].split(";") if d.strip()}
    assert policy["default-src"] == ["'self'"]
    for directive, sources in policy.items():
        for source in sources:
            assert source.startswith("'") or source in ("data:", "blob:"), (directive, source)


async def test_head_and_missing_static_files(client: httpx.AsyncClient) -> None:
    assert (await client.head("/docs")).status_code == 200
    assert (await client.get("/static/vendor/nothing.js")).status_code == 404
    assert (await client.get("/static/../routes_api_docs.py")).status_code == 404
    readme = await client.get("/static/vendor/README.md")
    assert readme.headers["cache-control"] == "public, no-cache"  # not in a versioned folder: revalidated
    assert "/docs" not in (await client.get("/openapi.json")).json()["paths"]


def test_vendored_files_match_the_readme() -> None:
    """Every file of every ``vendor/<package>-<version>/`` folder is listed in the README with its sha256, and each
    folder carries its package's LICENSE."""
    vendor = STATIC_DIR / "vendor"
    listed: dict[str, str] = {}
    folder = None
    for line in (vendor / "README.md").read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^## .* `([^`/]+)/`$", line)
        if heading:
            folder = heading.group(1)
        row = re.match(r"^\| `([^`]+)` \| `[^`]+` \| `([0-9a-f]{64})` \|$", line)
        if row:
            assert folder is not None, line
            listed[f"{folder}/{row.group(1)}"] = row.group(2)
    present = {p.relative_to(vendor).as_posix(): p for p in vendor.glob("*/**/*") if p.is_file()}
    assert sorted(present) == sorted(listed)
    for name, digest in listed.items():
        assert hashlib.sha256(present[name].read_bytes()).hexdigest() == digest, name
    folders = {name.split("/")[0] for name in present}
    assert len(folders) >= 2
    for name in folders:
        assert re.fullmatch(r".+-\d+\.\d+\.\d+.*", name), name  # <package>-<version>
        assert (vendor / name / "LICENSE").is_file(), name
