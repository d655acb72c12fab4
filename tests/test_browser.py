"""The studio page in a real browser: headless Debian Chromium driven by Playwright.

Loads the page, uploads a clip, clones, waits for the output audio, watches the "Prompt cache"
accordion count a hit after a second clone with the same prompt, clears the cache through the
confirmation step and sees zero. Saves ``test-artifacts/studio.png``. Chromium comes from
``apt-get install chromium`` (scripts/install.sh); Playwright never downloads a browser.
"""

import shutil
from pathlib import Path

import pytest

from testkit.studio_server import start_studio

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "test-artifacts"
EXAMPLE_TEXT = "The quiet harbour woke slowly as the first boats went out."


def _text_has(selector: str, text: str) -> str:
    return f"() => (document.querySelector('{selector}')?.innerText || '').includes('{text}')"


@pytest.mark.skipif(not CHROMIUM.exists() or shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install chromium; see scripts/install.sh)")
def test_clone_and_cache_in_the_browser(tmp_path):
    from playwright.sync_api import sync_playwright

    studio = start_studio(tmp_path)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            # Not "networkidle": Gradio keeps a heartbeat stream open.
            page.goto(studio.url + "/", wait_until="load")
            page.locator("#clone_btn").wait_for(timeout=30_000)
            assert "Preview" in page.locator("#engine_banner").inner_text()

            page.locator("#prompt_audio input[type=file]").set_input_files(str(ROOT / "examples" / "en_low.flac"))
            page.locator("#prompt_text textarea").fill(EXAMPLE_TEXT)
            page.locator("#target_text textarea").fill("Hello from the browser test.")
            page.locator("#clone_btn").click()
            page.wait_for_function(_text_has("#clone_summary", "total"), timeout=120_000)
            download = page.locator("#output_audio a[data-testid=download-link]")
            assert download.get_attribute("href").endswith(".wav")
            assert "cache hits: none" in page.locator("#clone_summary").inner_text()

            page.get_by_text("Prompt cache").click()
            page.wait_for_function(_text_has("#cache_summary", "hits 0 · misses 1"), timeout=30_000)

            # Same prompt again: the voice profile now comes from the cache.
            page.locator("#target_text textarea").fill("And a second sentence.")
            page.locator("#clone_btn").click()
            page.wait_for_function(_text_has("#clone_summary", "cache hits: prompt_analysis"), timeout=120_000)
            page.wait_for_function(_text_has("#cache_summary", "hits 1 · misses 1"), timeout=30_000)
            page.wait_for_function(_text_has("#history_table", "And a second sentence."), timeout=10_000)
            page.screenshot(path=str(ARTIFACTS / "studio.png"), full_page=True)

            page.locator("#cache_clear").click()
            confirm = page.locator("#cache_confirm")
            confirm.wait_for(state="visible", timeout=10_000)
            confirm.click()
            page.wait_for_function(_text_has("#cache_summary", "hits 0 · misses 0"), timeout=30_000)
            assert "entries 0" in page.locator("#cache_summary").inner_text()
            confirm.wait_for(state="hidden", timeout=10_000)
            assert studio.engine.cache.stats()["entries"] == 0
            page.screenshot(path=str(ARTIFACTS / "studio-cleared.png"), full_page=True)
            browser.close()
    finally:
        studio.stop()
