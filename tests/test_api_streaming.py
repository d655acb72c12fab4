"""Streaming speech over a real uvicorn server (preview engine): ``stream_format`` audio and sse.

Covers: pcm and wav bodies (the streaming WAV header's fields; the samples equal the stream's
final result length), SSE events in OpenAI's shapes (delta base64 audio, done with usage and our
timings incl. ttfa_ms), the official ``openai`` client's ``with_streaming_response`` for both,
the 400 for formats that cannot stream, and that a client that disconnects mid-stream stops the
engine (its sentence counter stops short of the text) while a later request is served.
"""

from __future__ import annotations

import base64
import json
import struct
import threading
import time

import httpx
import numpy as np
import openai
import pytest

import preview.engine as preview_engine
from testkit.paths import ROOT
from testkit.studio_server import start_studio

EXAMPLE = "examples/en_low.flac"
EXAMPLE_TEXT = "The quiet harbour woke slowly as the first boats went out."
TWO = "Hello there. How are you today?"
LONG = " ".join(f"This is sentence number {i} of a long text." for i in range(1, 21))


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    server = start_studio(tmp_path_factory.mktemp("stream"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(studio):
    with httpx.Client(base_url=studio.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def voice(http):
    r = http.post("/v1/audio/voices", files={"file": ("harbour.flac", (ROOT / EXAMPLE).read_bytes(), "audio/flac")},
                  data={"transcript": EXAMPLE_TEXT, "name": "Harbour"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _speech(voice, text=TWO, **extra):
    return {"model": "tts-1", "input": text, "voice": voice, "seed": 5, **extra}


def test_pcm_stream_is_headerless_16_bit_audio_of_the_whole_length(http, voice):
    with http.stream("POST", "/v1/audio/speech", json=_speech(voice, response_format="pcm",
                                                              stream_format="audio")) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("audio/L16") and r.headers["x-seed"] == "5"
        body = b"".join(r.iter_bytes())
    whole = http.post("/v1/audio/speech", json=_speech(voice, response_format="pcm"))
    assert len(body) % 2 == 0 and not body.startswith(b"RIFF")
    # Sentence by sentence vs whole-text adaptation: same length, not the same samples.
    assert len(body) == len(whole.content)
    timings = json.loads(whole.headers["x-timings"])
    assert timings["counters"]["ttfa_ms"] == pytest.approx(timings["total_ms"], abs=0.01)   # a whole file: all of it
    samples = np.frombuffer(body, "<i2")
    assert np.abs(samples).max() > 1000


def test_wav_stream_has_a_streaming_header(http, voice):
    with http.stream("POST", "/v1/audio/speech", json=_speech(voice, response_format="wav",
                                                              stream_format="audio")) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("audio/wav")
        body = b"".join(r.iter_bytes())
    riff, size, wave, fmt, fmt_len, pcm, channels, rate, byte_rate, align, bits = struct.unpack(
        "<4sI4s4sIHHIIHH", body[:36])
    data, data_size = struct.unpack("<4sI", body[36:44])
    assert (riff, wave, fmt, data) == (b"RIFF", b"WAVE", b"fmt ", b"data")
    assert size == data_size == 0xFFFFFFFF                 # unknown length: the stream is still being made
    assert (fmt_len, pcm, channels, rate, byte_rate, align, bits) == (16, 1, 1, 24000, 48000, 2, 16)
    assert (len(body) - 44) % 2 == 0 and len(body) - 44 > 24000


def test_sse_events_have_openai_shapes(http, voice):
    with http.stream("POST", "/v1/audio/speech", json=_speech(voice, response_format="pcm",
                                                              stream_format="sse")) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: ")]
    *deltas, done = events
    assert len(deltas) == 2 and all(e["type"] == "speech.audio.delta" for e in deltas)   # one per sentence
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    whole = http.post("/v1/audio/speech", json=_speech(voice, response_format="pcm"))
    assert len(audio) == len(whole.content)
    assert done["type"] == "speech.audio.done"
    usage = done["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] and usage["input_tokens"] > 0
    counters = done["timings"]["counters"]
    assert 0 < counters["ttfa_ms"] < done["timings"]["total_ms"]
    assert done["seed"] == 5


def test_openai_client_streaming_response(studio, voice):
    client = openai.OpenAI(base_url=studio.url + "/v1", api_key="unused", max_retries=0)
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice=voice, input=TWO, response_format="pcm", extra_body={"stream_format": "audio"}) as r:
        assert r.headers["x-seed"].isdigit()
        pieces = list(r.iter_bytes())
    assert sum(map(len, pieces)) > 48000
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice=voice, input=TWO, response_format="pcm", stream_format="sse") as r:
        types = [json.loads(line[6:])["type"] for line in r.iter_lines() if line.startswith("data: ")]
    assert types[-1] == "speech.audio.done" and types.count("speech.audio.delta") == 2


@pytest.mark.parametrize("fmt", ["mp3", "flac", "opus"])
def test_formats_that_cannot_stream_are_400s_naming_the_ones_that_can(http, voice, fmt):
    r = http.post("/v1/audio/speech", json=_speech(voice, response_format=fmt, stream_format="audio"))
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert f"'{fmt}' cannot be streamed" in message and "pcm, wav" in message


def test_bad_input_in_a_stream_is_a_json_400_before_any_audio(http, voice):
    r = http.post("/v1/audio/speech", json=_speech(voice, text="[Laughter]", response_format="pcm",
                                                   stream_format="audio"))
    assert r.status_code == 400 and "nothing to speak" in r.json()["error"]["message"]


def test_a_client_that_disconnects_stops_the_generation(http, studio, voice, monkeypatch):
    spoken = []
    real = preview_engine.espeak.speak
    lock = threading.Lock()

    def counting(text, *args, **kwargs):
        with lock:
            spoken.append(text)
        return real(text, *args, **kwargs)

    monkeypatch.setattr(preview_engine.espeak, "speak", counting)
    with http.stream("POST", "/v1/audio/speech", json=_speech(voice, text=LONG, response_format="pcm",
                                                              stream_format="audio")) as r:
        assert r.status_code == 200
        first = next(r.iter_bytes())
        assert first
    # The response is closed: the server sees the disconnect and cancels the stream.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        count = len(spoken)
        time.sleep(1.5)
        if len(spoken) == count:
            break
    stopped_at = len(spoken)
    time.sleep(1.5)
    assert len(spoken) == stopped_at, "the engine kept speaking after the client left"
    assert stopped_at < 20, f"all {stopped_at} sentences were spoken; the stream was not cancelled"
    later = http.post("/v1/audio/speech", json=_speech(voice, text="Still here.", response_format="pcm"))
    assert later.status_code == 200 and len(later.content) > 0
    metrics = http.get("/metrics").text
    assert 'studio_requests_total{endpoint="speech_stream",status="disconnected"} 1.0' in metrics
    streamed = [line for line in metrics.splitlines() if line.startswith('studio_ttfa_seconds_count{endpoint="speech_stream"}')]
    assert streamed and float(streamed[0].split()[-1]) >= 1              # finished streams observed their TTFA
