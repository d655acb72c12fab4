"""The page's 2026-01 features in a real browser (headless Debian Chromium driven by Playwright).

Uploading a clip fills the empty transcript box with the tiny Paraformer's transcription; a tag
palette button inserts its tag at the cursor (replacing a selection) in the text to speak; the
polyphone hint is shown; a clone whose text holds an unknown tag shows a warning naming it and
still produces audio; the Edit tab's palette and strength slider appear for paralinguistic edits.
Saves ``test-artifacts/studio-features.png``.
"""

import shutil
from pathlib import Path

import pytest

from testkit.paths import FIXTURES
from testkit.studio_server import start_studio

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "test-artifacts"


@pytest.mark.skipif(not CHROMIUM.exists() or shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install chromium; see scripts/install.sh)")
def test_palette_transcript_and_tag_warning_in_the_browser(tmp_path):
    from playwright.sync_api import sync_playwright

    shutil.copytree(FIXTURES / "tokenizer" / "Step-Audio-Tokenizer", tmp_path / "models" / "Step-Audio-Tokenizer")
    studio = start_studio(tmp_path, None, "--model-root", str(tmp_path / "models"))
    heard = studio.engine.transcribe(str(ROOT / "examples" / "en_low.flac")).text
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.goto(studio.url + "/", wait_until="load")
            page.locator("#clone_btn").wait_for(timeout=30_000)
            assert "guo4" in page.locator("#target_text").inner_text()   # the polyphone hint

            page.locator("#prompt_audio input[type=file]").set_input_files(str(ROOT / "examples" / "en_low.flac"))
            page.wait_for_function(f"() => document.querySelector('#prompt_text textarea').value === {heard!r}",
                                   timeout=120_000)

            box = page.locator("#target_text textarea")
            box.fill("Hello world, bye.")
            # Select "world" and click a palette button: the tag replaces the selection.
            box.evaluate("el => { el.focus(); el.setSelectionRange(6, 11); }")
            page.locator("#clone_tags button", has_text="[clears throat]").click()
            page.wait_for_function("() => document.querySelector('#target_text textarea').value === "
                                   "'Hello [clears throat], bye.'", timeout=10_000)
            # The cursor now sits after the tag: a second tag goes right behind it.
            page.locator("#clone_tags button", has_text="[Question-yi]").click()
            page.wait_for_function("() => document.querySelector('#target_text textarea').value === "
                                   "'Hello [clears throat][Question-yi], bye.'", timeout=10_000)

            box.fill("That was [snicker] fun.")
            page.locator("#clone_btn").click()
            toast = page.get_by_text("[snicker]", exact=False).filter(has_text="Known paralinguistic tags")
            toast.first.wait_for(timeout=60_000)
            page.wait_for_function("() => (document.querySelector('#clone_summary')?.innerText || '')"
                                   ".includes('total')", timeout=120_000)

            page.get_by_role("tab", name="Edit").click()
            page.locator("#edit_type input").click()
            page.get_by_role("option", name="paralinguistic (unavailable)").click()
            page.locator("#para_tags").wait_for(state="visible", timeout=10_000)
            para = page.locator("#para_text textarea")
            para.fill("ab")
            para.evaluate("el => { el.focus(); el.setSelectionRange(1, 1); }")
            page.locator("#para_tags button", has_text="[Laughter]").click()
            page.wait_for_function("() => document.querySelector('#para_text textarea').value === 'a[Laughter]b'",
                                   timeout=10_000)
            assert page.locator("#edit_iterations").is_visible()
            page.screenshot(path=str(ARTIFACTS / "studio-features.png"), full_page=True)
            browser.close()
    finally:
        studio.stop()
