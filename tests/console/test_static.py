"""The console's files and `/docs` over the real app (no engine, no browser): types, local-only assets, packaging."""

from __future__ import annotations

import re
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.config import Settings
from server.console import STATIC_DIR

REPO = Path(__file__).resolve().parents[2]
OWN_FILES = [p for p in STATIC_DIR.rglob("*") if p.is_file() and "vendor" not in p.relative_to(STATIC_DIR).parts]
JAVASCRIPT_TYPES = ("text/javascript", "application/javascript")
# An XML namespace is a name, never fetched; it is the only absolute URL the console's own files may hold.
NAMESPACES = {"http://www.w3.org/2000/svg"}


class AssetLinks(HTMLParser):
    """Every `src` and `href` of a page, and the text of its inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("src", "href") and value]
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.scripts.append(data)


def links_of(html: str) -> AssetLinks:
    parser = AssetLinks()
    parser.feed(html)
    return parser


@pytest.fixture(scope="module")
def client():
    return TestClient(create_app(None, Settings()))


def test_console_page_is_html_with_a_same_origin_policy(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert client.head("/").status_code == 200


@pytest.mark.parametrize("path, content_type", [
    ("/console/js/main.js", JAVASCRIPT_TYPES), ("/console/console.css", ("text/css",)),
    ("/console/favicon.svg", ("image/svg+xml",)),
    ("/console/vendor/swagger-ui/swagger-ui-bundle.js", JAVASCRIPT_TYPES),
    ("/console/vendor/swagger-ui/swagger-ui.css", ("text/css",)),
])
def test_static_files_have_their_content_types(client, path, content_type):
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] in content_type
    assert response.content == (STATIC_DIR / path.removeprefix("/console/")).read_bytes()


def test_every_javascript_module_is_served_as_javascript(client):
    for module in sorted((STATIC_DIR / "js").glob("*.js")):
        response = client.get(f"/console/js/{module.name}")
        assert response.status_code == 200, module.name
        assert response.headers["content-type"].split(";")[0] in JAVASCRIPT_TYPES, module.name


def test_unknown_static_file_is_404_and_the_folder_cannot_be_left(client):
    assert client.get("/console/nope.js").status_code == 404
    assert client.get("/console/../config.py").status_code == 404
    assert client.get("/console/%2e%2e/__init__.py").status_code == 404


def test_console_page_loads_only_local_assets_that_exist(client):
    links = links_of(client.get("/").text).links
    assert links, "the page references no asset"
    for link in links:
        if link.startswith("#"):
            continue
        assert link.startswith("/") and not link.startswith("//"), link
        assert client.get(link).status_code == 200, link


def test_own_console_files_hold_no_absolute_url():
    assert OWN_FILES
    for path in OWN_FILES:
        found = set(re.findall(r"https?://[^\s\"'<>)]*", path.read_text(encoding="utf-8"))) - NAMESPACES
        assert not found, f"{path.relative_to(STATIC_DIR)}: {sorted(found)}"


def test_module_imports_resolve_and_tokens_never_reach_local_storage():
    for module in sorted((STATIC_DIR / "js").glob("*.js")):
        source = module.read_text(encoding="utf-8")
        for target in re.findall(r"""from\s+["'](\./[^"']+)["']""", source):
            assert (module.parent / target).is_file(), f"{module.name} imports missing {target}"
        assert not re.search(r"\b(localStorage|indexedDB|document\.cookie)\b\s*[.\[=]", source), module.name


def test_docs_page_uses_only_vendored_swagger_ui(client):
    response = client.get("/docs")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?://", response.text), "the docs page names an outside URL"
    page = links_of(response.text)
    assert {"/console/vendor/swagger-ui/swagger-ui-bundle.js", "/console/vendor/swagger-ui/swagger-ui.css"} \
        <= set(page.links)
    for link in page.links:
        assert link.startswith("/") and not link.startswith("//"), link
        assert client.get(link).status_code == 200, link
    script = "".join(page.scripts)
    assert "'/openapi.json'" in script and '"validatorUrl": null' in script
    assert "default-src 'self'" in response.headers["content-security-policy"]


def test_cdn_pages_are_gone_and_the_schema_is_unchanged(client):
    assert client.get("/redoc").status_code == 404
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and "/docs" not in paths and not any(p.startswith("/console") for p in paths)
    assert "/v1/adapters" in paths


def test_package_data_ships_every_static_file():
    """A non-editable install (the Docker image's) gets exactly the files the globs in pyproject.toml match."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "server.console"]
    package = STATIC_DIR.parent
    shipped = {p for pattern in patterns for p in package.glob(pattern) if p.is_file()}
    missing = [str(p.relative_to(package)) for p in STATIC_DIR.rglob("*") if p.is_file() and p not in shipped]
    assert not missing, f"not matched by package-data: {missing}"
