"""Fixtures of the web console's browser tests: one real server and one Chromium per module.

Module scope, not session: Playwright's sync API keeps an asyncio loop running in this thread while it
is open, so every later test that calls `asyncio.run` would fail if the browser outlived the module.
"""

from __future__ import annotations

import pytest

from tests.console.browser import PageLog, browser_missing, chromium, console_server


@pytest.fixture(scope="module")
def browser():
    reason = browser_missing()
    if reason:
        pytest.skip(f"browser tests need Chromium and Playwright: {reason}")
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def server_url(browser, tmp_path_factory):
    with console_server(tmp_path_factory.mktemp("console")) as url:
        yield url


@pytest.fixture
def page(browser):
    """A fresh browser context per test (its own sessionStorage), with the page's log attached as `page.log`."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.log = PageLog()
    page.log.attach(page)
    yield page
    context.close()
