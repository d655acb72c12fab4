"""Property-based fuzzing (hypothesis), short run: audio decoding and every JSON/multipart body of the API.

Covers: random and mutated WAV/FLAC/OGG/MP3 bytes give an ``Audio`` or an ``InputError``, never
another exception; random JSON to ``/v1/audio/speech`` and random multipart forms to
``/v1/audio/voices``, ``/v1/audio/edits`` and ``/v1/audio/voices/import`` are answered below 500
with a JSON error for 4xx, by the real app (preview engine) through Starlette's TestClient. The
long run is ``bench/fuzz.py``.
"""

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from core.settings import load_settings
from funasr_cache.store import PromptCache
from preview.engine import PreviewEngine
from testkit import fuzzing
from testkit.studio_server import speech_wav
from web.server import create_app

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(fuzzing.audio_bytes)
def test_decoding_never_fails_other_than_input_error(data):
    fuzzing.check_decoding(data)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    settings_ = load_settings(["--cache-dir", str(root / "cache"), "--data-dir", str(root / "data"),
                               "--max-upload-bytes", "300000",
                               "--max-prompt-seconds", "5", "--bundle-key", "fuzzing-bundle-key-123"], env={})
    app = create_app(PreviewEngine(settings_, PromptCache.from_settings(settings_)), settings_, root / "out")
    with TestClient(app, raise_server_exceptions=False) as client:
        voice = client.post("/v1/audio/voices", files={"file": ("s.wav", speech_wav(seconds=1.0), "audio/wav")},
                            data={"transcript": "a short hum"})
        assert voice.status_code == 201, voice.text
        bundle = client.get(f"/v1/audio/voices/{voice.json()['id']}/export")
        assert bundle.status_code == 200
        yield client, voice.json()["id"], bundle.content


@pytest.mark.slow
def test_speech_json_bodies_never_give_a_5xx(api):
    client, voice_id, _ = api

    @FUZZ
    @given(fuzzing.speech_bodies(voice_id))
    def run(body):
        fuzzing.check_response(client.post("/v1/audio/speech", content=body,
                                           headers={"Content-Type": "application/json"}))

    run()


@pytest.mark.slow
def test_multipart_bodies_never_give_a_5xx(api):
    client, voice_id, bundle = api

    @FUZZ
    @given(fuzzing.form_request(voice_id, bundle))
    def run(request):
        path, fields, files = request
        fuzzing.check_response(client.post(path, data=fields, files=files or None))

    run()
