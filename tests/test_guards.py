"""web.guards and the hardening around the API, against real servers on 127.0.0.1.

Covers: a chunked (no Content-Length) body far over the upload limit is refused with 413 while it
streams in -- before parsing (without the key: a 401 before any byte is read) -- and the server process's peak
memory and its temp folder grow by less than the limit; a browser form POST from another site to
``/v1/cache/clear`` or ``/v1/audio/voices/import`` is refused (same-origin, no Origin, and a
configured CORS origin pass); ``/readyz`` is 503 when the engine serving is not the one
configured; a ``/metrics`` scrape neither takes the cache's file lock nor rewrites ``stats.json``;
with an API key the page's named API needs a login.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import httpx
import pytest

from testkit.studio_server import speech_wav, start_studio, start_studio_process

KEY = "guard-test-key"
LIMIT = 2_000_000


def _folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue
    return total


def _multipart_stream(total_bytes: int, boundary: str = "guardboundary"):
    """A multipart voice upload whose file part is ``total_bytes`` of zeros, in 64 KiB chunks."""
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"transcript\"\r\n\r\nx\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.wav\"\r\n"
           f"Content-Type: audio/wav\r\n\r\n").encode()
    chunk = b"\0" * 65536
    for _ in range(total_bytes // len(chunk)):
        yield chunk
    yield f"\r\n--{boundary}--\r\n".encode()


@pytest.fixture(scope="module")
def process_studio(tmp_path_factory):
    studio = start_studio_process(tmp_path_factory.mktemp("guards"), "--api-key", KEY,
                                  "--max-upload-bytes", str(LIMIT))
    yield studio
    studio.stop()


@pytest.mark.slow
def test_a_chunked_body_far_over_the_limit_is_refused_as_it_streams(process_studio):
    studio = process_studio
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "multipart/form-data; boundary=guardboundary"}
    with httpx.Client(base_url=studio.url, timeout=120) as client:
        # Warm-up: a chunked upload within the limit is parsed and served normally.
        wav = speech_wav()
        body = [(b"--guardboundary\r\nContent-Disposition: form-data; name=\"transcript\"\r\n\r\nhum\r\n"
                 b"--guardboundary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s.wav\"\r\n"
                 b"Content-Type: audio/wav\r\n\r\n"), wav, b"\r\n--guardboundary--\r\n"]
        ok = client.post("/v1/audio/voices", content=iter(body), headers=headers)
        assert ok.status_code == 201, ok.text
        # Warm-up of the refusal path too (first-use allocations of the parser and the spool file),
        # so that what is measured below is what a body's size costs.
        assert client.post("/v1/audio/voices", content=_multipart_stream(2 * LIMIT),
                           headers=headers).status_code == 413
        peak_before = studio.rss_kib("VmHWM")

        temp_peak, done = [0], threading.Event()

        def watch_temp():
            while not done.is_set():
                temp_peak[0] = max(temp_peak[0], _folder_bytes(studio.tmpdir))

        watcher = threading.Thread(target=watch_temp, daemon=True)
        watcher.start()
        try:
            big = client.post("/v1/audio/voices", content=_multipart_stream(25 * LIMIT), headers=headers)
        finally:
            done.set()
            watcher.join()
        assert big.status_code == 413, big.text
        assert big.json()["error"]["code"] == "payload_too_large"
        assert f"limited to {LIMIT} bytes" in big.json()["error"]["message"]
        grown_kib = studio.rss_kib("VmHWM") - peak_before
        assert grown_kib * 1024 < LIMIT, f"peak memory grew by {grown_kib} KiB for a {25 * LIMIT}-byte body"
        assert temp_peak[0] <= LIMIT + 64 * 1024

        # Without the key: 401 before a byte of the body is parsed, whatever its size (web.guards.KeyGuard).
        no_key = {"Content-Type": headers["Content-Type"]}
        assert client.post("/v1/audio/voices", content=_multipart_stream(25 * LIMIT),
                           headers=no_key).status_code == 401
        assert client.post("/v1/audio/voices", content=iter(body), headers=no_key).status_code == 401
        # A chunked JSON body (read into RAM by the route) is cut off the same way.
        json_stream = (b"{\"input\": \"" + b"a" * 65536 * (i > 0) for i in range(80))
        r = client.post("/v1/audio/speech", content=json_stream,
                        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        assert r.status_code == 413
        assert client.get("/healthz").status_code == 200
    assert "Traceback" not in studio.log()


# ------------------------------------------------------------------------------ in-process servers

@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    server = start_studio(tmp_path_factory.mktemp("origin"), None, "--cors-origins", "https://app.example")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def voice(studio):
    r = httpx.post(studio.url + "/v1/audio/voices", files={"file": ("s.wav", speech_wav(), "audio/wav")},
                   data={"transcript": "a short hum"}, timeout=120)
    assert r.status_code == 201, r.text
    return r.json()


@pytest.mark.slow
def test_a_form_post_from_another_site_cannot_clear_the_cache_or_import(studio, voice):
    assert studio.engine.cache.stats()["entries"] >= 1
    evil = {"Origin": "http://evil.example"}
    r = httpx.post(studio.url + "/v1/cache/clear", headers=evil, data={"x": "1"})  # an HTML form's POST
    assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin_refused"
    assert studio.engine.cache.stats()["entries"] >= 1
    bundle = httpx.get(f"{studio.url}/v1/audio/voices/{voice['id']}/export").content
    before = {v["id"] for v in httpx.get(studio.url + "/v1/audio/voices").json()["data"]}
    r = httpx.post(studio.url + "/v1/audio/voices/import", headers=evil,
                   files={"file": ("v.zip", bundle, "application/zip")})
    assert r.status_code == 403
    assert {v["id"] for v in httpx.get(studio.url + "/v1/audio/voices").json()["data"]} == before
    # A sandboxed page says Origin: null; also refused. Reading stays open to any origin.
    assert httpx.post(studio.url + "/v1/cache/clear", headers={"Origin": "null"}).status_code == 403
    assert httpx.get(studio.url + "/v1/cache/stats", headers=evil).status_code == 200

    # The page's own origin, a configured CORS origin and non-browser clients (no Origin) pass.
    own = studio.url.replace("http://", "https://")  # a TLS proxy in front: only the host must match
    r = httpx.post(studio.url + "/v1/audio/voices/import", headers={"Origin": own},
                   files={"file": ("v.zip", bundle, "application/zip")}, timeout=120)
    assert r.status_code == 201, r.text
    preflight = httpx.options(studio.url + "/v1/cache/clear", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.post(studio.url + "/v1/cache/clear", headers={"Origin": "https://app.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert httpx.post(studio.url + "/v1/cache/clear").status_code == 200


@pytest.mark.slow
def test_metrics_scrape_takes_no_lock_and_writes_nothing(studio, voice, monkeypatch):
    for _ in range(2):  # the second one is a cache hit whatever ran before
        r = httpx.post(studio.url + "/v1/audio/speech", json={"input": "Count me.", "voice": voice["id"],
                                                              "response_format": "wav"}, timeout=120)
        assert r.status_code == 200
    cache = studio.engine.cache
    cache.stats()  # flush this process's counts
    stats_file = cache.root / "stats.json"
    before = (stats_file.read_bytes(), stats_file.stat().st_mtime_ns)

    def no_lock(*args, **kwargs):   # fault injection: any use of the folder lock fails loudly
        raise RuntimeError("the scrape took the cache lock")

    monkeypatch.setattr(cache, "_locked", no_lock)
    text = httpx.get(studio.url + "/metrics").text
    monkeypatch.undo()
    assert (stats_file.read_bytes(), stats_file.stat().st_mtime_ns) == before
    hits = [line for line in text.splitlines() if line.startswith("studio_prompt_cache_hits ")]
    assert hits and float(hits[0].split()[1]) == cache.stats()["hits"] >= 1


@pytest.mark.slow
def test_readyz_is_503_when_another_engine_serves_than_configured(tmp_path):
    server = start_studio(tmp_path, None, "--engine", "step-audio")  # the preview engine, as a fallback would
    try:
        r = httpx.get(server.url + "/readyz")
        assert r.status_code == 503 and r.json() == {
            "ready": False, "reason": "the preview engine is serving, but engine=step-audio is configured"}
    finally:
        server.stop()
    server = start_studio(tmp_path / "p", None, "--engine", "preview")
    try:
        assert httpx.get(server.url + "/readyz").status_code == 200
    finally:
        server.stop()


@pytest.mark.slow
def test_with_an_api_key_the_named_ui_api_needs_a_login(tmp_path):
    from gradio_client import Client

    server = start_studio(tmp_path, None, "--api-key", KEY)  # ui_requires_key is on by default
    try:
        assert httpx.post(server.url + "/gradio_api/call/cache_clear", json={"data": []}).status_code == 401
        assert httpx.get(server.url + "/gradio_api/info").status_code == 401
        stats = Client(server.url, auth=("anyone", KEY), verbose=False).predict(api_name="/cache_stats")
        assert "entries" in stats
    finally:
        server.stop()
