"""The web console at `/` and the API docs at `/docs`, both served from files inside the package.

Nothing is fetched from a CDN: the console is plain HTML, CSS and JS modules (`server/console/static/`)
and `/docs` is Swagger UI from the vendored `swagger-ui-dist` files, so both work offline. The pages
send a Content-Security-Policy that allows only this origin, so a stray external asset would fail
loudly in the browser instead of silently phoning out. These routes need no token: the console asks
for the admin token itself and sends it with each API call.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from server.console import INDEX_HTML, STATIC_DIR

STATIC_PREFIX = "/console"
SWAGGER_PREFIX = f"{STATIC_PREFIX}/vendor/swagger-ui"
# The console has no inline script or style; Swagger UI's page (FastAPI's template) has one inline
# script and Swagger UI sets inline styles and data: images.
CONSOLE_CSP = ("default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
               "form-action 'none'; frame-ancestors 'none'")
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def install_console(app: FastAPI) -> None:
    """Mount the static files and add `/` and `/docs` (left out of the OpenAPI schema).

    The app must be created with `docs_url=None` (FastAPI's own `/docs` loads Swagger UI from a CDN)
    and `redoc_url=None` (ReDoc likewise, and it is not vendored).
    """
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC_DIR), name="console")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def console() -> FileResponse:
        return FileResponse(INDEX_HTML, media_type="text/html",
                            headers={"Content-Security-Policy": CONSOLE_CSP, "Cache-Control": "no-cache",
                                     **SECURITY_HEADERS})

    @app.api_route("/docs", methods=["GET", "HEAD"], include_in_schema=False)
    async def docs() -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} API docs",
            swagger_js_url=f"{SWAGGER_PREFIX}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER_PREFIX}/swagger-ui.css",
            swagger_favicon_url=f"{STATIC_PREFIX}/favicon.svg",
            # Swagger UI's default sends the spec's URL to an online validator for a badge.
            swagger_ui_parameters={"validatorUrl": None})
        page.headers.update({"Content-Security-Policy": DOCS_CSP, **SECURITY_HEADERS})
        return page
