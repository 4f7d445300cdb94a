"""The web console in headless Chromium against a real server with the shipped adapters.

What a user sees is checked against what the API says: the table against `GET /v1/adapters`, the
playground's streamed answers against the same greedy completion asked over plain HTTP.
"""

from __future__ import annotations

import shutil

import httpx
import pytest

from tests.console.browser import (ADMIN_TOKEN, API_KEY, SHIPPED_ADAPTERS, SHIPPED_NAMES, STREAM_TIMEOUT_MS,
                                   UI_TIMEOUT_MS, drop_files, sign_in)

pytestmark = pytest.mark.slow

PROMPT = "Input: Priya, 23, from Buenos Aires thinks the movie is poor.\nOutput:"
MAX_TOKENS = 12
BASE_NAME = "SmolLM2-135M-Instruct"


def api(url: str, method: str, path: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN if path.startswith('/v1/adapters') else API_KEY}"}
    return httpx.request(method, f"{url}{path}", headers=headers, timeout=STREAM_TIMEOUT_MS / 1000, **kwargs)


def greedy(url: str, model: str) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    response = api(url, "POST", "/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def row(page, name: str):
    return page.locator(f"#adapters-rows tr[data-adapter='{name}']")


def cell(page, name: str, field: str):
    return row(page, name).locator(f"td[data-field='{field}']")


def run_playground(page, models: list[str]) -> dict[str, dict]:
    """Tick exactly `models`, run the prompt, wait for every answer; {model: {text, stats, chunks}}."""
    page.click("a[data-view-link='playground']")
    page.wait_for_selector("#playground-models input", timeout=UI_TIMEOUT_MS)
    for box in page.locator("#playground-models input").all():
        if box.is_checked() != (box.get_attribute("value") in models):
            box.click()
    page.fill("#playground-prompt", PROMPT)
    page.fill("#playground-max-tokens", str(MAX_TOKENS))
    page.fill("#playground-temperature", "0")
    page.click("#playground-run")
    cards = page.locator("#playground-answers .answer")
    page.locator("#playground-answers .answer[data-done]").nth(len(models) - 1).wait_for(timeout=STREAM_TIMEOUT_MS)
    assert cards.count() == len(models)
    return {card.get_attribute("data-model"): {"text": card.locator(".text").inner_text(),
                                               "stats": card.locator(".stats").inner_text(),
                                               "done": card.get_attribute("data-done"),
                                               "chunks": int(card.get_attribute("data-chunks") or 0)}
            for card in cards.all()}


def test_console_loads_lists_shipped_adapters_and_docs_are_offline(page, server_url):
    sign_in(page, server_url)
    listed = {a["id"]: a for a in api(server_url, "GET", "/v1/adapters").json()["data"]}
    assert sorted(listed) == SHIPPED_NAMES
    for name, adapter in listed.items():
        row(page, name).wait_for(timeout=UI_TIMEOUT_MS)
        assert cell(page, name, "status").inner_text() == adapter["status"]
        assert cell(page, name, "rank").inner_text() == str(adapter["rank"])
        assert cell(page, name, "sha256").get_attribute("title") == adapter["sha256"]
        assert cell(page, name, "targets").inner_text() == ", ".join(adapter["target_modules"])
        assert cell(page, name, "size").get_attribute("title") == f"{adapter['size_bytes']:,} bytes"
    assert page.locator("#adapters-rows tr").count() == len(SHIPPED_NAMES)
    # The tokens live in this tab's sessionStorage only.
    assert page.evaluate("sessionStorage.getItem('loraplex.adminToken')") == ADMIN_TOKEN
    assert page.evaluate("localStorage.length") == 0

    # Keyboard: Tab walks the skip link, the views, the docs and the tokens button in reading order,
    # Enter opens a view and focus moves to it.
    page.evaluate("document.activeElement.blur()")
    stops = []
    for _ in range(7):
        page.keyboard.press("Tab")
        stops.append(page.evaluate("document.activeElement.textContent.trim()"))
    assert stops == ["Skip to content", "Adapters", "Upload", "Playground", "API docs", "Tokens…", "Refresh"]
    page.focus("a[data-view-link='upload']")
    page.keyboard.press("Enter")
    page.wait_for_selector("#view-upload:not([hidden])", timeout=UI_TIMEOUT_MS)
    assert page.evaluate("document.activeElement.id") == "main"
    page.keyboard.press("Tab")  # the first control of the upload form
    assert page.evaluate("document.activeElement.id") == "upload-name"

    page.click("a[href='/docs']")
    page.wait_for_selector(".swagger-ui .opblock", timeout=UI_TIMEOUT_MS)
    assert page.locator(".swagger-ui .opblock-summary-path", has_text="/v1/completions").count() >= 1
    assert page.log.errors == []
    origin = f"{server_url}/"
    assert [u for u in page.log.requests if not u.startswith(origin)] == []


def test_narrow_screen_stacks_the_table(browser, server_url):
    context = browser.new_context(viewport={"width": 390, "height": 800})
    try:
        page = context.new_page()
        sign_in(page, server_url)
        first = row(page, SHIPPED_NAMES[0])
        first.wait_for(timeout=UI_TIMEOUT_MS)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        assert cell(page, SHIPPED_NAMES[0], "rank").evaluate("td => getComputedStyle(td, '::before').content") \
            == '"Rank"'
    finally:
        context.close()


def test_wrong_admin_token_is_explained_and_asked_again(page, server_url):
    page.goto(f"{server_url}/")
    page.wait_for_selector("#credentials-dialog[open]", timeout=UI_TIMEOUT_MS)
    page.fill("#admin-token", "not-the-token")
    page.click("#credentials-save")  # the refusal opens the dialog again at once: no wait for it to close
    page.locator("#adapters-error", has_text="admin token is wrong (HTTP 401)").wait_for(timeout=UI_TIMEOUT_MS)
    page.wait_for_selector("#credentials-dialog[open]", timeout=UI_TIMEOUT_MS)
    assert "admin token" in page.inner_text("#credentials-reason")
    page.fill("#admin-token", ADMIN_TOKEN)
    page.click("#credentials-save")
    row(page, SHIPPED_NAMES[0]).wait_for(timeout=UI_TIMEOUT_MS)
    assert page.locator("#adapters-error").is_hidden()


@pytest.mark.full
def test_playground_streams_four_different_answers(page, server_url):
    sign_in(page, server_url)
    expected = {name: greedy(server_url, name) for name in SHIPPED_NAMES}
    assert len(set(expected.values())) == 4, expected
    answers = run_playground(page, [BASE_NAME, *SHIPPED_NAMES])
    assert sorted(answers) == sorted([BASE_NAME, *SHIPPED_NAMES])
    for name in SHIPPED_NAMES:
        answer = answers[name]
        assert answer["done"] == "true", answer
        assert answer["text"].strip() == expected[name].strip(), (name, answer)
        assert "TTFT" in answer["stats"] and " ms" in answer["stats"], answer
        if answer["chunks"] > 1:
            assert "tok/s" in answer["stats"] and "– tok/s" not in answer["stats"], answer
    assert max(a["chunks"] for a in answers.values()) > 1  # tokens arrived one by one, not in one piece
    assert answers[BASE_NAME]["done"] == "true"


@pytest.mark.full
def test_upload_appears_answers_overwrites_and_deletes(page, server_url, tmp_path):
    sign_in(page, server_url)
    page.click("a[data-view-link='upload']")
    source = SHIPPED_ADAPTERS / "sentiment"
    files = {f: (source / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}
    drop_files(page, "#dropzone", {**files, "README.md": b"not sent"})
    assert page.locator("#upload-files li.ignored").inner_text().startswith("README.md")
    page.fill("#upload-name", "my-sentiment")
    page.click("#upload-submit")
    page.wait_for_selector("#upload-result.ok", timeout=STREAM_TIMEOUT_MS)
    assert "my-sentiment" in page.inner_text("#upload-result")
    assert page.locator("#upload-progress").get_attribute("value") == "100"

    adapter = api(server_url, "GET", "/v1/adapters/my-sentiment").json()
    page.click("a[data-view-link='adapters']")
    row(page, "my-sentiment").wait_for(timeout=UI_TIMEOUT_MS)
    assert cell(page, "my-sentiment", "sha256").get_attribute("title") == adapter["sha256"]
    assert cell(page, "my-sentiment", "version").inner_text() == "1"

    answers = run_playground(page, ["my-sentiment"])
    assert answers["my-sentiment"]["text"].strip() == greedy(server_url, "sentiment").strip()

    # Overwrite with another adapter's folder, chosen as a folder: a new version with other weights.
    folder = tmp_path / "shout-copy"
    shutil.copytree(SHIPPED_ADAPTERS / "shout", folder)
    page.click("a[data-view-link='adapters']")
    row(page, "my-sentiment").locator("button", has_text="Overwrite").click()
    page.wait_for_selector("#view-upload:not([hidden])", timeout=UI_TIMEOUT_MS)
    assert page.input_value("#upload-name") == "my-sentiment" and page.is_checked("#upload-overwrite")
    page.set_input_files("#folder-input", str(folder))
    assert page.input_value("#upload-name") == "my-sentiment"  # a name the user set is kept
    page.click("#upload-submit")
    page.wait_for_selector("#upload-result.ok", timeout=STREAM_TIMEOUT_MS)
    replaced = api(server_url, "GET", "/v1/adapters/my-sentiment").json()
    assert replaced["version"] == 2 and replaced["sha256"] != adapter["sha256"]
    page.click("a[data-view-link='adapters']")
    cell(page, "my-sentiment", "version").filter(has_text="2").wait_for(timeout=UI_TIMEOUT_MS)

    row(page, "my-sentiment").locator("button", has_text="Delete").click()
    page.click("#confirm-yes")
    row(page, "my-sentiment").wait_for(state="detached", timeout=UI_TIMEOUT_MS)
    assert "Deleted my-sentiment" in page.inner_text("#adapters-message")
    assert api(server_url, "GET", "/v1/adapters/my-sentiment").status_code == 404
    assert page.log.errors == []


@pytest.mark.full
def test_refused_upload_shows_the_servers_reason(page, server_url, tmp_path):
    config = (SHIPPED_ADAPTERS / "sentiment" / "adapter_config.json").read_bytes()
    bad_weights = b"\xff" * 8 + b"this is not a safetensors file"
    direct = api(server_url, "POST", "/v1/adapters", data={"name": "broken"},
                 files={"adapter_config.json": ("adapter_config.json", config),
                        "adapter_model.safetensors": ("adapter_model.safetensors", bad_weights)})
    assert direct.status_code == 400
    reason = direct.json()["error"]["message"]

    sign_in(page, server_url)
    page.click("a[data-view-link='upload']")
    (tmp_path / "adapter_config.json").write_bytes(config)
    (tmp_path / "adapter_model.safetensors").write_bytes(bad_weights)
    page.set_input_files("#file-input", [str(tmp_path / "adapter_config.json"),
                                         str(tmp_path / "adapter_model.safetensors")])
    page.fill("#upload-name", "broken")
    page.click("#upload-submit")
    error = page.locator("#upload-error")
    error.wait_for(state="visible", timeout=STREAM_TIMEOUT_MS)
    assert "HTTP 400" in error.inner_text() and reason in error.inner_text()
    assert page.locator("#upload-result.ok").count() == 0
    assert api(server_url, "GET", "/v1/adapters/broken").status_code == 404

    # A selection the server would refuse anyway is explained before anything is sent.
    page.click("#upload-clear")
    page.set_input_files("#file-input", [str(tmp_path / "adapter_config.json")])
    page.click("#upload-submit")
    assert "adapter_model.safetensors is missing" in error.inner_text()
