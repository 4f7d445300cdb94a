"""The web console's static files (HTML, CSS, JS modules) and the vendored Swagger UI, shipped as package data.

Nothing here is built: the files under `static/` are served as they are by `server/api/console_routes.py`.
"""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
INDEX_HTML = STATIC_DIR / "index.html"
SWAGGER_UI_DIR = STATIC_DIR / "vendor" / "swagger-ui"
