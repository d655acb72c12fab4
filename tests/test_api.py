"""HTTP API of the studio (web.api, web.api_voices, web.deps) against a real server on 127.0.0.1.

Covers: OpenAI-client speech with a stored voice, voices CRUD, export/import bundles (matching
and foreign namespaces), edits, cache stats/clear, JSON errors (404, 400, 413, 401, 500 with a
request id), /healthz, /readyz (engine state), and X-Timings on every audio response. The engine
is the real preview engine; mocks only inject faults.
"""

import io
import json
import zipfile
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from testkit.studio_server import speech_wav, start_studio

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key-123"
BUNDLE_KEY = "bundle-signing-key-for-tests"
EXAMPLE = "examples/en_low.flac"
EXAMPLE_TEXT = "The quiet harbour woke slowly as the first boats went out."


STUDIO_FLAGS = ("--api-key", KEY, "--max-upload-bytes", "400000", "--max-prompt-seconds", "8",
                "--bundle-key", BUNDLE_KEY)  # for conftest's studio


@pytest.fixture(scope="module")
def http(studio):
    with httpx.Client(base_url=studio.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def voice(http):
    data = (ROOT / EXAMPLE).read_bytes()
    r = http.post("/v1/audio/voices", files={"file": ("harbour.flac", data, "audio/flac")},
                  data={"transcript": EXAMPLE_TEXT, "name": "Harbour"})
    assert r.status_code == 201, r.text
    return r.json()


def _decode(data: bytes) -> tuple[np.ndarray, int]:
    samples, rate = sf.read(io.BytesIO(data), dtype="float32")
    return samples, rate


def test_create_voice_prepares_the_prompt_at_once(voice, studio):
    assert voice["id"].startswith("harbour-")
    assert voice["prepared"]["misses"] == ["preview_voice"]
    assert voice["duration_s"] > 2.0
    # The profile is in the cache now, so preparing the same clip again is a hit.
    assert studio.engine.prepare_prompt(studio.app.state.voices.audio(voice["id"])).hits == {"preview_voice"}


def test_openai_client_speech_with_stored_voice(studio, voice):
    client = openai.OpenAI(base_url=studio.url + "/v1", api_key=KEY, max_retries=0)
    raw = client.audio.speech.with_raw_response.create(model="step-audio-editx", voice=voice["id"],
                                                       input="Hello from the test suite.", response_format="wav")
    samples, rate = _decode(raw.parse().content)
    assert rate == 24000 and samples.ndim == 1
    assert 0.5 < len(samples) / rate < 10 and np.abs(samples).max() > 0.01
    timings = json.loads(raw.headers["x-timings"])
    assert "prompt_analysis" in timings["cached"], "the stored voice's profile should come from the cache"
    assert timings["total_ms"] > 0 and "synthesis" in timings["stages_ms"]
    assert raw.headers["x-seed"].isdigit()


@pytest.mark.parametrize("fmt", ["flac", "mp3", "opus", "pcm"])
def test_speech_formats(http, voice, fmt):
    r = http.post("/v1/audio/speech", json={"model": "tts-1", "input": "Short.", "voice": voice["id"],
                                            "response_format": fmt, "seed": 3})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith({"flac": "audio/flac", "mp3": "audio/mpeg", "opus": "audio/ogg",
                                                  "pcm": "audio/L16"}[fmt])
    assert "x-timings" in r.headers
    if fmt == "pcm":
        assert len(r.content) % 2 == 0 and len(r.content) > 24000  # > 0.5 s of 16-bit samples
    else:
        samples, rate = _decode(r.content)
        assert len(samples) / rate > 0.3


def test_speech_stream_format_audio_streams_the_same_kind_of_body(http, voice):
    with http.stream("POST", "/v1/audio/speech", json={"input": "Streaming.", "voice": voice["id"],
                                                       "response_format": "wav", "stream_format": "audio"}) as r:
        assert r.status_code == 200
        body = b"".join(r.iter_bytes())
    assert _decode(body)[1] == 24000


def test_voices_crud(http, voice):
    listed = http.get("/v1/audio/voices").json()
    assert voice["id"] in [v["id"] for v in listed["data"]]
    got = http.get(f"/v1/audio/voices/{voice['id']}").json()
    assert got["transcript"] == EXAMPLE_TEXT and got["digest"] == voice["digest"]

    r = http.post("/v1/audio/voices", files={"file": ("s.wav", speech_wav(), "audio/wav")},
                  data={"transcript": "a short hum"})
    assert r.status_code == 201, r.text
    temp_id = r.json()["id"]
    assert http.delete(f"/v1/audio/voices/{temp_id}").json() == {"id": temp_id, "object": "voice", "deleted": True}
    gone = http.get(f"/v1/audio/voices/{temp_id}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "voice_not_found"
    assert http.delete(f"/v1/audio/voices/{temp_id}").status_code == 404


def test_export_import_round_trip(http, studio, voice, tmp_path):
    bundle = http.get(f"/v1/audio/voices/{voice['id']}/export")
    assert bundle.status_code == 200 and bundle.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(bundle.content)).namelist()
    assert {"voice.json", "audio.wav"} <= set(names) and any(n.startswith("entries/0/") for n in names)

    assert bundle.headers["x-bundle-signed"] == "true"
    # A second server with its own cache and the same bundle key: the signed entry is imported, so
    # nothing is recomputed.
    other = start_studio(tmp_path, None, "--bundle-key", BUNDLE_KEY)
    try:
        with httpx.Client(base_url=other.url, timeout=120) as client:
            seed_voice = client.post("/v1/audio/voices", files={"file": ("s.wav", speech_wav(), "audio/wav")},
                                     data={"transcript": "a short hum"})
            assert seed_voice.status_code == 201
            misses_before = other.engine.cache.stats()["misses"]
            r = client.post("/v1/audio/voices/import", files={"file": ("v.zip", bundle.content, "application/zip")})
            assert r.status_code == 201, r.text
            imported = r.json()
            assert imported["signed"] is True and imported["trust"] == ""
            assert imported["imported"] == ["preview_voice"] and imported["recomputed"] == []
            assert imported["prepared"]["hits"] == ["preview_voice"]
            assert imported["digest"] == voice["digest"] and imported["transcript"] == EXAMPLE_TEXT
            assert other.engine.cache.stats()["misses"] == misses_before

            # Imported seconds are not "saved" seconds: the entry's cost is not taken from the bundle.
            saved_before = other.engine.cache.stats()["seconds_saved"]
            speech = client.post("/v1/audio/speech", json={"input": "Hi.", "voice": imported["id"],
                                                           "response_format": "wav"})
            assert "prompt_analysis" in json.loads(speech.headers["x-timings"])["cached"]
            assert other.engine.cache.stats()["seconds_saved"] == saved_before

            # The same bundle changed after signing (another model's namespace): not trusted, recomputed.
            foreign = _rewrite_namespace(bundle.content, "other-model@0000/v9")
            r = client.post("/v1/audio/voices/import", files={"file": ("v.zip", foreign, "application/zip")},
                            data={"name": "foreign"})
            assert r.status_code == 201, r.text
            assert r.json()["imported"] == [] and r.json()["name"] == "foreign" and r.json()["signed"] is False
    finally:
        other.stop()
    # A server without the key (or with another one) recomputes the entries of the same bundle.
    third = start_studio(tmp_path / "third", None)
    try:
        r = httpx.post(third.url + "/v1/audio/voices/import", timeout=120,
                       files={"file": ("v.zip", bundle.content, "application/zip")})
        assert r.status_code == 201, r.text
        assert (r.json()["imported"], r.json()["recomputed"], r.json()["signed"]) == ([], ["preview_voice"], False)
    finally:
        third.stop()


def _rewrite_entries(bundle: bytes, change) -> bytes:
    """A copy of an exported voice bundle with ``change(entries)`` applied to its cache entries."""
    source = zipfile.ZipFile(io.BytesIO(bundle))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if name == "voice.json":
                meta = json.loads(data)
                change(meta["entries"])
                data = json.dumps(meta).encode()
            target.writestr(name, data)
    return out.getvalue()


def _rewrite_namespace(bundle: bytes, namespace: str) -> bytes:
    def change(entries):
        for entry in entries:
            entry["namespace"] = namespace
    return _rewrite_entries(bundle, change)


def test_import_rejects_bad_bundles(http):
    r = http.post("/v1/audio/voices/import", files={"file": ("v.zip", b"not a zip", "application/zip")})
    assert r.status_code == 400 and "not a zip" in r.json()["error"]["message"]
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("voice.json", "{}")
        zf.writestr("../../etc/passwd", "x")
    r = http.post("/v1/audio/voices/import", files={"file": ("v.zip", evil.getvalue(), "application/zip")})
    assert r.status_code == 400 and "unexpected files" in r.json()["error"]["message"]


def test_edit_speed_faster_shortens_the_clip(http, voice):
    original = http.post("/v1/audio/speech", json={"input": "One two three four five.", "voice": voice["id"],
                                                   "response_format": "wav", "seed": 1})
    samples, rate = _decode(original.content)
    r = http.post("/v1/audio/edits", files={"file": ("o.wav", original.content, "audio/wav")},
                  data={"edit_type": "speed", "edit_info": "faster", "audio_text": "One two three four five."})
    assert r.status_code == 200, r.text
    edited, edited_rate = _decode(r.content)
    assert edited_rate == 24000 and len(edited) < 0.95 * len(samples)
    assert "x-timings" in r.headers


def test_edit_errors_are_specific(http, voice):
    r = http.post("/v1/audio/edits", data={"voice": voice["id"], "edit_type": "paralinguistic"})
    assert r.status_code == 400 and "not available" in r.json()["error"]["message"]
    r = http.post("/v1/audio/edits", data={"voice": voice["id"], "edit_type": "emotion", "edit_info": "bored"})
    assert r.status_code == 400 and "unknown emotion option 'bored'" in r.json()["error"]["message"]
    r = http.post("/v1/audio/edits", data={"edit_type": "denoise"})
    assert r.status_code == 400 and "exactly one of" in r.json()["error"]["message"]


def test_error_cases_with_openai_client(studio, voice):
    client = openai.OpenAI(base_url=studio.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.audio.speech.create(model="tts-1", voice="no-such-voice", input="Hello")
    assert "no voice with id 'no-such-voice'" in str(unknown.value)
    with pytest.raises(openai.BadRequestError) as empty:
        client.audio.speech.create(model="tts-1", voice=voice["id"], input="   ")
    assert "input is empty" in str(empty.value)
    with pytest.raises(openai.BadRequestError) as speed:
        client.audio.speech.create(model="tts-1", voice=voice["id"], input="Hi", speed=1.5)
    assert "edit_type=speed" in str(speed.value)
    bad = openai.OpenAI(base_url=studio.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.audio.speech.create(model="tts-1", voice=voice["id"], input="Hello")


def test_error_bodies_are_json(studio, http):
    no_key = httpx.post(studio.url + "/v1/audio/speech", json={"input": "x", "voice": "v"})
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    assert no_key.headers["www-authenticate"] == "Bearer"
    traversal = http.get("/v1/audio/voices/..%2F..%2Fetc")
    assert traversal.status_code == 404 and "error" in traversal.json()
    bad_id = http.get("/v1/audio/voices/Not.An.Id")
    assert bad_id.status_code == 404 and bad_id.json()["error"]["code"] == "voice_not_found"
    missing_field = http.post("/v1/audio/speech", json={"voice": "x"})
    assert missing_field.status_code == 400 and "input" in missing_field.json()["error"]["message"]
    body = missing_field.json()["error"]
    assert body["request_id"] == missing_field.headers["x-request-id"]
    no_id = http.post("/v1/audio/speech", json={"input": "x", "voice": {"name": "v"}})
    assert no_id.status_code == 400 and "stored voice id" in no_id.json()["error"]["message"]
    wrong_method = http.put("/v1/audio/speech", json={})
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert wrong_method.headers["allow"] == "POST"
    assert http.put("/v1/audio/voices/some-id").status_code == 405
    assert http.get("/v1/no/such/endpoint").json()["error"]["code"] == "not_found"


def test_oversize_upload_is_413(http):
    big = b"\0" * 500_000  # over the server's 400 000-byte limit
    r = http.post("/v1/audio/voices", files={"file": ("big.wav", big, "audio/wav")}, data={"transcript": "x"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    # Without Content-Length (chunked), the body limit cuts it off while it streams in.
    boundary = "studioboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"transcript\"\r\n\r\nx\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode() + big + f"\r\n--{boundary}--\r\n".encode()
    chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
    r = http.post("/v1/audio/voices", content=chunks,
                  headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and "limited to 400000 bytes" in r.json()["error"]["message"]


def test_too_long_prompt_is_400(http):
    r = http.post("/v1/audio/voices", files={"file": ("long.wav", speech_wav(seconds=9.0, rate=8000), "audio/wav")},
                  data={"transcript": "a long hum"})
    assert r.status_code == 400 and "the limit is 8 s" in r.json()["error"]["message"]


def test_unexpected_failure_is_500_with_request_id_and_no_internals(http, studio, voice, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(studio.engine, "clone", broken)  # fault injection
    r = http.post("/v1/audio/speech", json={"input": "Hello", "voice": voice["id"]})
    assert r.status_code == 500
    error = r.json()["error"]
    assert "secret" not in error["message"] and error["request_id"] in error["message"]
    assert any("secret internal detail" in (rec.exc_text or "") for rec in caplog.records)


def test_failure_outside_the_engine_is_a_json_500_too(http, studio, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret store detail")

    monkeypatch.setattr(studio.app.state.voices, "list", broken)  # fault injection
    r = http.get("/v1/audio/voices")
    assert r.status_code == 500
    error = r.json()["error"]
    assert "secret" not in error["message"] and error["request_id"] in error["message"]
    assert r.headers["x-request-id"] == error["request_id"]


@pytest.mark.parametrize("field, value", [("payload", {"junk": 1}), ("cost_s", -1.0), ("cost_s", 1e9)])
def test_a_bundle_with_a_changed_entry_cannot_touch_the_cache(http, studio, voice, field, value):
    # Same audio and namespace as the stored voice, but an entry changed after export: its signature
    # no longer verifies, so nothing of it is stored; the existing entry stays and the voice works.
    entry_before = studio.engine.export_prompt(studio.app.state.voices.audio(voice["id"]))[0]
    bundle = http.get(f"/v1/audio/voices/{voice['id']}/export").content
    damaged = _rewrite_entries(bundle, lambda entries: entries[0].__setitem__(field, value))
    r = http.post("/v1/audio/voices/import", files={"file": ("v.zip", damaged, "application/zip")})
    assert r.status_code == 201, r.text
    assert r.json()["signed"] is False and "changed after signing" in r.json()["trust"]
    assert r.json()["imported"] == [] and r.json()["prepared"]["hits"] == ["preview_voice"]
    entry_after = studio.engine.export_prompt(studio.app.state.voices.audio(voice["id"]))[0]
    assert (entry_after.payload, entry_after.cost_s) == (entry_before.payload, entry_before.cost_s)
    assert http.delete(f"/v1/audio/voices/{r.json()['id']}").status_code == 200
    r = http.post("/v1/audio/speech", json={"input": "Still here.", "voice": voice["id"], "response_format": "wav"})
    assert r.status_code == 200, r.text


def test_export_counts_no_cache_hit(http, studio, voice):
    before = http.get("/v1/cache/stats").json()
    assert http.get(f"/v1/audio/voices/{voice['id']}/export").status_code == 200
    after = http.get("/v1/cache/stats").json()
    assert [after[k] for k in ("hits", "misses", "seconds_saved")] == \
        [before[k] for k in ("hits", "misses", "seconds_saved")]


def test_cache_stats_and_clear(http, studio, voice):
    # A use of the stored voice makes its own hit: this test needs no earlier test's requests.
    before = http.get("/v1/cache/stats").json()["hits"]
    r = http.post("/v1/audio/speech", json={"input": "Hit.", "voice": voice["id"], "response_format": "wav"})
    assert r.status_code == 200 and "prompt_analysis" in json.loads(r.headers["x-timings"])["cached"]
    stats = http.get("/v1/cache/stats").json()
    assert stats["hits"] >= before + 1 and stats["entries"] >= 1
    cleared = http.post("/v1/cache/clear").json()
    assert cleared["cleared"] is True and cleared["stats"]["entries"] == 0
    # Stored voices survive a clear; the next use fills the profile from the voice database (it is
    # stored with the voice) instead of recomputing it.
    r = http.post("/v1/audio/speech", json={"input": "Again.", "voice": voice["id"], "response_format": "wav"})
    assert r.status_code == 200
    assert "prompt_store" in json.loads(r.headers["x-timings"])["cached"]
    assert http.get("/v1/cache/stats").json()["store_fills"] >= 1


def test_engine_and_models(http):
    engine = http.get("/v1/engine").json()
    assert engine["preview"] is True
    paralinguistic = next(e for e in engine["edits"] if e["edit_type"] == "paralinguistic")
    assert paralinguistic["available"] is False
    assert http.get("/v1/models").json()["data"][0]["id"] == "step-audio-editx"


def test_health_and_readiness(studio, monkeypatch):
    assert httpx.get(studio.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(studio.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    monkeypatch.setattr(studio.engine, "ready", lambda: (False, "models still loading"))  # fault injection
    not_ready = httpx.get(studio.url + "/readyz")
    assert not_ready.status_code == 503 and not_ready.json() == {"ready": False, "reason": "models still loading"}


def test_metrics_after_requests(studio, http, voice):
    assert http.post("/v1/audio/speech", json={"input": "Count me.", "voice": voice["id"]}).status_code == 200
    text = httpx.get(studio.url + "/metrics").text  # open without the API key, like /healthz
    from prometheus_client.parser import text_string_to_metric_families

    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in text_string_to_metric_families(text) for s in family.samples}
    assert values[("studio_requests_total", (("endpoint", "speech"), ("status", "ok")))] >= 1
    assert values[("studio_stage_seconds_count", (("cached", "hit"), ("endpoint", "speech"),
                                                  ("stage", "prompt_analysis")))] >= 1
    assert values[("studio_prompt_cache_hits", ())] == studio.engine.cache.stats()["hits"]
    assert ("studio_queue_depth", ()) in values
