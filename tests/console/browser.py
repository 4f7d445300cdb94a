"""Headless Chromium (the system's, driven by Playwright) against a real `loraplex serve` for the web console.

Shared by the browser tests and `tests/console/screenshots.py`. Chromium is Debian's `/usr/bin/chromium`
(or `$CHROMIUM`); Playwright never downloads a browser here. `browser_missing()` says why the browser
tests cannot run, so they skip with that reason.
"""

from __future__ import annotations

import base64
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import TEST_CACHE
from tests.e2e.server_process import running_server

REPO = Path(__file__).resolve().parents[2]
SHIPPED_ADAPTERS = REPO / "adapters"
SHIPPED_NAMES = sorted(p.name for p in SHIPPED_ADAPTERS.iterdir() if (p / "adapter_config.json").is_file())
ADMIN_TOKEN = "console-admin-token"
API_KEY = "console-api-key"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
UI_TIMEOUT_MS = 15_000
# Generation on a busy 2-core machine can take seconds per token: streams get minutes.
STREAM_TIMEOUT_MS = 240_000


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright's Python package is not installed (run `make console-deps`)"
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (run `make console-deps`, which installs Debian's chromium)"
    return None


@contextmanager
def chromium():
    """A headless Chromium browser (Playwright `Browser`)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def console_server(scratch: Path, *flags: str):
    """A real server on a copy of the shipped adapters, with an admin token and an API key. Yields its URL."""
    store = scratch / "store"
    shutil.copytree(SHIPPED_ADAPTERS, store, ignore=shutil.ignore_patterns(".loraplex-registry.json"))
    env = {"LORAPLEX_ADMIN_TOKEN": ADMIN_TOKEN, "LORAPLEX_API_KEY": API_KEY, "OMP_NUM_THREADS": "1"}
    # A small KV cache (the console sends a handful of short requests) and a short drain keep start and stop quick.
    with running_server("--adapters-dir", str(store), "--cache-dir", str(TEST_CACHE), "--device", "cpu",
                        "--kv-cache-tokens", "4096", "--shutdown-grace", "2", *flags, env=env) as url:
        yield url


@dataclass
class PageLog:
    """What the page said: console errors and warnings, uncaught exceptions, and every URL it requested."""

    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def attach(self, page) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.on("request", lambda request: self.requests.append(request.url))

    def _console(self, message) -> None:
        if message.type in ("error", "warning"):
            self.errors.append(f"console.{message.type}: {message.text}")


def sign_in(page, url: str, admin: str = ADMIN_TOKEN, key: str = API_KEY) -> None:
    """Open the console; it asks for the tokens by itself (no admin token yet); give them."""
    page.goto(f"{url}/")
    page.wait_for_selector("#credentials-dialog[open]", timeout=UI_TIMEOUT_MS)
    page.fill("#admin-token", admin)
    page.fill("#api-key", key)
    page.click("#credentials-save")
    page.wait_for_selector("#credentials-dialog:not([open])", state="attached", timeout=UI_TIMEOUT_MS)


def drop_files(page, selector: str, files: dict[str, bytes]) -> None:
    """Drop `files` (name -> bytes) on `selector` as a user dragging them from a file manager would."""
    encoded = {name: base64.b64encode(data).decode() for name, data in files.items()}
    transfer = page.evaluate_handle(
        """(files) => {
            const transfer = new DataTransfer();
            for (const [name, b64] of Object.entries(files)) {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                transfer.items.add(new File([bytes], name));
            }
            return transfer;
        }""", encoded)
    for event in ("dragenter", "dragover", "drop"):
        page.dispatch_event(selector, event, {"dataTransfer": transfer})
