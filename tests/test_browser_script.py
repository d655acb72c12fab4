"""The "Script" tab in a real browser (headless Debian Chromium, Playwright).

Pastes a two-voice script, casts it from the stored voices, generates (the table fills as takes land),
regenerates one row (it gets a second take, the other rows keep theirs), renders, and downloads the
audio and the SRT, checking that the SRT names both speakers and the audio is as long as the manifest says.
"""

import io
import shutil
from pathlib import Path

import httpx
import pytest
import soundfile as sf

from testkit.studio_server import speech_wav, start_studio

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SCRIPT = "Alice: Good morning.\nBob: Is the harbour quiet?\nAlice: It is."


def _cells(page) -> list[list[str]]:
    """The segment table's cells by row (Gradio's data frame marks each cell ``cell-<row>-<col>``)."""
    return page.evaluate("""() => { const rows = [];
        for (const cell of document.querySelectorAll('#script_segments [data-testid^="cell-"]')) {
            const [, r, c] = cell.dataset.testid.split('-').map(Number);
            (rows[r] = rows[r] || [])[c] = cell.innerText.trim(); }
        return rows; }""")


@pytest.mark.skipif(not CHROMIUM.exists() or shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install chromium; see scripts/install.sh)")
def test_script_tab_generates_regenerates_renders_and_downloads(tmp_path):
    from playwright.sync_api import sync_playwright

    studio = start_studio(tmp_path)
    try:
        with httpx.Client(base_url=studio.url, timeout=60) as http:
            for name, f0 in (("alice", 210.0), ("bob", 110.0)):
                r = http.post("/v1/audio/voices", files={"file": ("v.wav", speech_wav(f0=f0), "audio/wav")},
                              data={"transcript": "A short sentence.", "name": name})
                assert r.status_code == 201, r.text
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.goto(studio.url + "/", wait_until="load")
            page.get_by_role("tab", name="Script").click()
            page.locator("#script_text textarea").fill(SCRIPT)
            page.locator("#script_cast_btn").click()
            page.locator("#script_cast_1").wait_for(state="visible", timeout=30_000)
            assert "Voice for Bob" in page.locator("#script_cast_1").inner_text()
            page.locator("#script_generate").click()
            page.wait_for_function("() => (document.querySelector('#script_progress')?.innerText || '').includes('3 ready')",
                                   timeout=120_000)
            rows = _cells(page)
            assert [r[1] for r in rows] == ["Alice", "Bob", "Alice"] and all(r[3] == "ready" and r[4] == "1" for r in rows)

            # Regenerate the selected row (the first): it gets a second take, the others keep theirs.
            page.locator("#script_regenerate").click()
            page.wait_for_function("""() => [0, 1, 2].map(r => document.querySelector(
                `#script_segments [data-testid="cell-${r}-4"]`)?.innerText.trim()).join(',') === '2,1,1'""",
                                   timeout=120_000)
            after = _cells(page)
            page.wait_for_function("() => (document.querySelector('#script_take_pick input')?.value || '').includes('(chosen)')",
                                   timeout=30_000)
            assert after[1][5] == rows[1][5] and after[2][5] == rows[2][5] and after[0][5] != rows[0][5]

            page.locator("#script_render").click()
            page.wait_for_function("() => (document.querySelector('#script_render_summary')?.innerText || '').includes('segments')",
                                   timeout=120_000)
            links = page.locator("#script_downloads a").evaluate_all("els => els.map(e => e.href)")
            audio_url = next(u for u in links if u.split("?")[0].endswith(".wav"))
            srt_url = next(u for u in links if u.split("?")[0].endswith(".srt"))
            srt = page.request.get(srt_url).text()
            assert "Alice: Good morning." in srt and "Bob: Is the harbour quiet?" in srt
            samples, rate = sf.read(io.BytesIO(page.request.get(audio_url).body()), dtype="float32")
            summary = page.locator("#script_render_summary").inner_text()
            assert f"{len(samples) / rate:.1f} s" in summary
            browser.close()
    finally:
        studio.stop()
