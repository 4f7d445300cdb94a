"""Screenshots of the web console's views for docs/console.md: `make console-screenshots` (writes docs/console-*.png).

Starts a real server on a copy of the shipped adapters, runs the playground over the base model and the
four shipped adapters, uploads a copy of one adapter through the page, and shoots each view.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tests.console.browser import (REPO, SHIPPED_ADAPTERS, STREAM_TIMEOUT_MS, UI_TIMEOUT_MS, browser_missing,
                                   chromium, console_server, drop_files, sign_in)

OUT = REPO / "docs"
WIDE, NARROW = {"width": 1280, "height": 760}, {"width": 390, "height": 900}


def shoot(page, name: str) -> None:
    path = OUT / f"console-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"wrote {path.relative_to(REPO)}")


def main() -> int:
    reason = browser_missing()
    if reason:
        print(f"cannot take screenshots: {reason}", file=sys.stderr)
        return 1
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch, console_server(Path(scratch)) as url, chromium() as browser:
        page = browser.new_page(viewport=WIDE)
        sign_in(page, url)
        page.click("a[data-view-link='playground']")
        page.wait_for_selector("#playground-models input:checked", timeout=UI_TIMEOUT_MS)
        page.click("#playground-run")
        page.locator(".answer[data-done]").nth(4).wait_for(timeout=STREAM_TIMEOUT_MS)
        shoot(page, "playground")

        page.click("a[data-view-link='upload']")
        source = SHIPPED_ADAPTERS / "sentiment"
        drop_files(page, "#dropzone", {f: (source / f).read_bytes()
                                       for f in ("adapter_config.json", "adapter_model.safetensors", "README.md")})
        page.fill("#upload-name", "my-sentiment")
        page.click("#upload-submit")
        page.wait_for_selector("#upload-result.ok", timeout=STREAM_TIMEOUT_MS)
        shoot(page, "upload")

        page.click("a[data-view-link='adapters']")
        page.wait_for_selector("#adapters-rows tr[data-adapter='my-sentiment']", timeout=UI_TIMEOUT_MS)
        page.mouse.move(0, 0)
        shoot(page, "adapters")

        narrow = browser.new_page(viewport=NARROW)
        sign_in(narrow, url)
        narrow.wait_for_selector("#adapters-rows tr", timeout=UI_TIMEOUT_MS)
        narrow.screenshot(path=str(OUT / "console-narrow.png"), clip={"x": 0, "y": 0, "width": 390, "height": 900})
        print("wrote docs/console-narrow.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
