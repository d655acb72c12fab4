"""The 2026-01 features over HTTP and through the page's API, against a real server on 127.0.0.1.

Covers: ``instructions`` on ``POST /v1/audio/speech`` (an edit chain applied after the clone, echoed
in ``X-Edit-Chain``; English, Chinese and the ``openai`` client; unmappable or unavailable edits are
a 400 before any clone runs), ``iterations`` on ``POST /v1/audio/edits`` (range, ``X-Iterations``, a
stronger effect), voices and edits without a transcript (the tiny Paraformer transcribes them),
``POST /v1/audio/transcriptions`` (json and text), the preview without an ASR model refusing
clearly, unknown-tag warnings (``X-Warning``), and the page: ``/transcribe``, a clone with an empty
transcript, and ``/edit`` with iterations putting every pass in the history.
The engine is the real preview engine; the ASR is the tiny random-weight Paraformer fixture.
"""

import io
import shutil
from urllib.parse import unquote

import httpx
import openai
import pytest
import soundfile as sf
from gradio_client import Client, handle_file

from testkit.paths import FIXTURES, ROOT
from testkit.studio_server import start_studio

pytestmark = pytest.mark.slow

EXAMPLE = ROOT / "examples" / "en_low.flac"
EXAMPLE_TEXT = "The quiet harbour woke slowly as the first boats went out."


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    shutil.copytree(FIXTURES / "tokenizer" / "Step-Audio-Tokenizer", root / "models" / "Step-Audio-Tokenizer")
    server = start_studio(root, None, "--model-root", str(root / "models"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(studio):
    with httpx.Client(base_url=studio.url, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def voice(http):
    r = http.post("/v1/audio/voices", files={"file": ("harbour.flac", EXAMPLE.read_bytes())},
                  data={"transcript": EXAMPLE_TEXT, "name": "Harbour"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.fixture(scope="module")
def heard(studio):
    """What the tiny Paraformer hears in the example clip (the engine's own answer, computed once)."""
    return studio.engine.transcribe(str(EXAMPLE)).text


def _seconds(data: bytes) -> float:
    samples, rate = sf.read(io.BytesIO(data))
    return len(samples) / rate


def _speech(http, voice, **extra):
    return http.post("/v1/audio/speech", json={"input": "A short test sentence.", "voice": voice,
                                               "response_format": "wav", "seed": 5, **extra})


# ----------------------------------------------------------------------------- instructions

def test_instructions_apply_an_edit_chain_after_the_clone(http, voice):
    plain = _speech(http, voice)
    slower = _speech(http, voice, instructions="a bit slower")
    assert plain.status_code == slower.status_code == 200
    assert "x-edit-chain" not in plain.headers and slower.headers["x-edit-chain"] == "speed:slower"
    assert _seconds(slower.content) > 1.1 * _seconds(plain.content)
    assert slower.headers["x-seed"] == plain.headers["x-seed"] == "5"

    chinese = _speech(http, voice, instructions="慢很多，去除静音")
    assert chinese.status_code == 200, chinese.text
    assert [unquote(p) for p in chinese.headers["x-edit-chain"].split(",")] == ["speed:more slower", "vad"]


def test_instructions_through_the_openai_client(studio, voice):
    client = openai.OpenAI(base_url=studio.url + "/v1", api_key="unused", max_retries=0)
    raw = client.audio.speech.with_raw_response.create(model="tts-1", voice=voice, input="Hello there.",
                                                       response_format="wav", instructions="faster x2")
    assert raw.headers["x-edit-chain"] == "speed:faster,speed:faster"
    assert _seconds(raw.parse().content) > 0.2


def test_instructions_that_cannot_be_done_are_refused_before_the_clone(http, voice, studio):
    hits = http.get("/v1/cache/stats").json()["hits"]
    r = _speech(http, voice, instructions="whisper, sing like an opera star")
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "'sing like an opera star'" in message and "whisper" in message and "开心" in message
    unavailable = next(c for c in studio.engine.capabilities() if c.edit_type == "emotion").unavailable_options[0]
    r = _speech(http, voice, instructions=unavailable)
    assert r.status_code == 400 and "not available in this engine" in r.json()["error"]["message"]
    assert http.get("/v1/cache/stats").json()["hits"] == hits   # no clone ran (it would look the voice up)


# ----------------------------------------------------------------------------- iterations

def test_edit_iterations_over_http(http, voice):
    once = http.post("/v1/audio/edits", data={"voice": voice, "edit_type": "speed", "edit_info": "slower",
                                              "seed": 3})
    thrice = http.post("/v1/audio/edits", data={"voice": voice, "edit_type": "speed", "edit_info": "slower",
                                                "seed": 3, "iterations": 3})
    assert once.status_code == thrice.status_code == 200
    assert once.headers["x-iterations"] == "1" and thrice.headers["x-iterations"] == "3"
    assert thrice.headers["x-seed"] == "3"
    assert _seconds(thrice.content) > 1.3 * _seconds(once.content)
    for bad in ("0", "6", "two"):
        r = http.post("/v1/audio/edits", data={"voice": voice, "edit_type": "vad", "iterations": bad})
        assert r.status_code == 400 and "iterations" in r.json()["error"]["message"]


# ----------------------------------------------------------------------------- transcription

def test_voice_without_transcript_is_transcribed(http, heard):
    r = http.post("/v1/audio/voices", files={"file": ("clip.flac", EXAMPLE.read_bytes())}, data={"name": "Heard"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["transcribed"] is True and body["transcript"] == heard
    speech = _speech(http, body["id"])
    assert speech.status_code == 200
    given = http.post("/v1/audio/voices", files={"file": ("clip.flac", EXAMPLE.read_bytes())},
                      data={"transcript": EXAMPLE_TEXT}).json()
    assert given["transcribed"] is False and given["transcript"] == EXAMPLE_TEXT


def test_transcriptions_endpoint(http, heard):
    r = http.post("/v1/audio/transcriptions", files={"file": ("clip.flac", EXAMPLE.read_bytes())},
                  data={"model": "whisper-1"})
    assert r.status_code == 200 and r.json() == {"text": heard}
    assert "asr" in r.headers["x-timings"]
    r = http.post("/v1/audio/transcriptions", files={"file": ("clip.flac", EXAMPLE.read_bytes())},
                  data={"response_format": "text"})
    assert r.status_code == 200 and r.text == heard and r.headers["content-type"].startswith("text/plain")
    r = http.post("/v1/audio/transcriptions", files={"file": ("clip.flac", EXAMPLE.read_bytes())},
                  data={"response_format": "srt"})
    assert r.status_code == 400 and "json, text, verbose_json" in r.json()["error"]["message"]


def test_verbose_transcriptions_carry_word_times(studio, http, heard):
    # OpenAI's form: timestamp_granularities[] repeated, verbose_json. The tiny model's words are timed
    # from its CIF weights (tests/test_asr_timing.py checks the arithmetic).
    r = http.post("/v1/audio/transcriptions", files={"file": ("clip.flac", EXAMPLE.read_bytes())},
                  data={"response_format": "verbose_json", "timestamp_granularities[]": ["word", "segment"]})
    assert r.status_code == 200, r.text
    body = r.json()
    duration = sf.info(io.BytesIO(EXAMPLE.read_bytes())).duration
    assert body["text"] == heard and body["task"] == "transcribe" and abs(body["duration"] - duration) < 1e-3
    assert body["words"] and "".join(w["word"] for w in body["words"]) == heard.replace(" ", "")
    assert all(0 <= w["start"] <= w["end"] <= body["duration"] for w in body["words"])
    assert body["segments"] == [{"id": 0, "start": 0.0, "end": body["duration"], "text": heard}]
    plain = http.post("/v1/audio/transcriptions", files={"file": ("clip.flac", EXAMPLE.read_bytes())},
                      data={"response_format": "verbose_json"}).json()
    assert "words" not in plain and plain["text"] == heard
    # OpenAI's own client asks the same way and reads the words.
    client = openai.OpenAI(base_url=studio.url + "/v1", api_key="unused", max_retries=0)
    verbose = client.audio.transcriptions.create(file=("clip.flac", EXAMPLE.read_bytes()), model="whisper-1",
                                                 response_format="verbose_json", timestamp_granularities=["word"])
    assert verbose.text == heard and [w.word for w in verbose.words] == [w["word"] for w in body["words"]]
    for data, words in (({"timestamp_granularities[]": "word"}, "needs response_format verbose_json"),
                        ({"response_format": "verbose_json", "timestamp_granularities[]": "char"}, "word or segment")):
        r = http.post("/v1/audio/transcriptions", files={"file": ("clip.flac", EXAMPLE.read_bytes())}, data=data)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_edit_of_a_file_without_audio_text_is_transcribed(http):
    r = http.post("/v1/audio/edits", files={"file": ("clip.flac", EXAMPLE.read_bytes())},
                  data={"edit_type": "speed", "edit_info": "faster"})
    assert r.status_code == 200, r.text


def test_preview_without_asr_model_refuses_clearly(tmp_path):
    server = start_studio(tmp_path, None, "--model-root", str(tmp_path / "no-models"))
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            r = http.post("/v1/audio/voices", files={"file": ("clip.flac", EXAMPLE.read_bytes())})
            assert r.status_code == 400
            assert "preview engine cannot transcribe" in r.json()["error"]["message"]
            assert http.get("/v1/audio/voices").json()["data"] == []
    finally:
        server.stop()


# ----------------------------------------------------------------------------- tag warnings

def test_unknown_tags_warn_but_go_through(http, voice):
    r = _speech(http, voice, input="Well [giggle] that was [snicker] odd.")
    assert r.status_code == 200
    warning = unquote(r.headers["x-warning"])
    assert "[snicker]" in warning and "[giggle]" not in warning.split(":")[0] and "[clears throat]" in warning
    r.headers["x-warning"].encode("ascii")
    assert "x-warning" not in _speech(http, voice, input="Well [giggle] that was odd.").headers


# ----------------------------------------------------------------------------- the page

def test_page_transcribes_and_edits_with_iterations(studio, heard):
    client = Client(studio.url + "/", verbose=False, download_files=False)
    assert "/transcribe" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert client.predict(handle_file(str(EXAMPLE)), api_name="/transcribe") == heard
    # A clone with an empty transcript transcribes the clip first.
    # (the last output, the streaming player, is there when the server has ffmpeg)
    _, _, summary, _, table, _, *_streamed = client.predict(handle_file(str(EXAMPLE)), "", "Hello from the page.", 4,
                                                           10, "wav", api_name="/clone")
    assert "seed 4" in summary and "| 1 | clone |" in table
    _, _, _, history, table, base, *_streamed = client.predict("speed", "slower", "", 9, 10, "wav", 3, api_name="/edit")
    ops = [line.split(" | ")[1] for line in table.splitlines()[2:]]
    assert ops == ["clone", "speed: slower 1/3 (of #1)", "speed: slower 2/3 (of #2)", "speed: slower 3/3 (of #3)"]
    seeds = [line.split(" | ")[3] for line in table.splitlines()[3:]]
    assert seeds == ["9", "10", "11"] and len(history["choices"]) == 4 and "#4" in base
