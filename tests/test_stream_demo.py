"""web/stream_demo.html (GET /stream-demo) in a real browser: headless Debian Chromium driven by Playwright.

Covers: the page opens the WebSocket with the key as a subprotocol from its own origin, typing sends the
text as it is typed, each sentence is announced and its audio decoded and queued while typing goes on,
and "Finish" ends the session normally.
"""

import shutil
from pathlib import Path

import httpx
import pytest

from testkit.studio_server import start_studio

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--autoplay-policy=no-user-gesture-required"]
KEY = "demo-key"


@pytest.mark.skipif(not CHROMIUM.exists() or shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install chromium; see scripts/install.sh)")
def test_typing_streams_to_the_voice(tmp_path):
    from playwright.sync_api import sync_playwright

    studio = start_studio(tmp_path, None, "--api-key", KEY)
    try:
        clip = (ROOT / "examples" / "en_low.flac").read_bytes()
        reply = httpx.post(studio.url + "/v1/audio/voices", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                           files={"file": ("voice.flac", clip)},
                           data={"transcript": "The quiet harbour woke slowly as the first boats went out."})
        assert reply.status_code == 201, reply.text
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
            page = browser.new_page()
            page.goto(studio.url + "/stream-demo", wait_until="load")
            page.fill("#voice", reply.json()["id"])
            page.fill("#key", KEY)
            page.click("#start")
            page.locator("#text:not([disabled])").wait_for(timeout=30_000)
            page.locator("#text").press_sequentially("Hello there. How are", delay=15)
            # The first sentence is spoken while the second is still being typed.
            page.wait_for_function("() => document.querySelector('#log').textContent.includes('segment.end')",
                                   timeout=60_000)
            log = page.locator("#log").inner_text()
            assert "segment.start: Hello there. " in log and "How are" not in log
            assert page.evaluate("window.samplesPlayed") > 10_000
            page.locator("#text").press_sequentially(" you?", delay=15)
            page.click("#stop")
            page.wait_for_function("() => document.querySelector('#log').textContent.includes('closed')",
                                   timeout=60_000)
            log = page.locator("#log").inner_text()
            assert "segment.start: How are you?" in log and "session.done" in log and "closed 1000 done" in log
            browser.close()
    finally:
        studio.stop()
