"""WS /v1/audio/speech/stream (web/api_stream_ws.py) with a real WebSocket client (``websockets``) against
real uvicorn servers on 127.0.0.1: the preview engine, and the Step-Audio engine on tiny random-weight
models (for the LLM rows).

Covers: text sent in small deltas gives the segments the segmenter cuts from the whole text and, per
segment, the audio of ``POST /v1/audio/speech`` with that segment's text and seed (preview: the whole
file within 1 LSB, the streamed body byte for byte; Step-Audio: the streamed body byte for byte and the
whole file's length); events and audio in order; wav and opus frames; edits that change between
segments; the key (header or subprotocol) and the Origin check at the handshake; bad input (unknown
voice, not JSON, binary frames, a first message that is not session.open, text after close, an unknown
message type) and the limits (session time, session text, sessions at once, a client that does not read)
each closing with its code; the maximum wait; cancel and disconnect freeing the LLM rows (the backend's
own counters, not timing).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import socket
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import FIXTURES
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from testkit.paths import ROOT
from testkit.studio_server import start_studio
from tts_engine.text_segmenter import TextSegmenter

KEY = "ws-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLE_TEXT = "The quiet harbour woke slowly as the first boats went out."
TEXT = "Hello there. How are you today? I am fine, thanks"
LONG = " ".join(f"This is sentence number {i} of a long text." for i in range(1, 31))


# ----------------------------------------------------------------------------- helpers

def ws_url(studio) -> str:
    return studio.url.replace("http://", "ws://") + "/v1/audio/speech/stream"


@dataclasses.dataclass
class Session:
    events: list
    audio: dict            # segment index -> bytes (-1: before any segment, e.g. the wav header)
    frames: list           # ("event", type) / ("audio", index) in arrival order
    close_code: int | None
    close_reason: str

    def of(self, kind: str) -> list:
        return [e for e in self.events if e["type"] == kind]


def read_all(ws, timeout: float = 120) -> Session:
    events, audio, frames, index = [], {}, [], -1
    try:
        while True:
            message = ws.recv(timeout=timeout)
            if isinstance(message, bytes):
                audio[index] = audio.get(index, b"") + message
                frames.append(("audio", index))
            else:
                event = json.loads(message)
                events.append(event)
                frames.append(("event", event["type"]))
                if event["type"] == "segment.start":
                    index = event["index"]
    except ConnectionClosed:
        pass
    return Session(events, audio, frames, ws.close_code, ws.close_reason)


def open_message(voice, **extra) -> str:
    return json.dumps({"type": "session.open", "voice": voice, "response_format": "pcm", "seed": 5, **extra})


def speak(studio, voice, text, step=4, headers=AUTH, **extra) -> Session:
    with connect(ws_url(studio), additional_headers=headers, max_size=None) as ws:
        try:
            ws.send(open_message(voice, **extra))
            for i in range(0, len(text), step):
                ws.send(json.dumps({"type": "text", "text": text[i:i + step]}))
            ws.send(json.dumps({"type": "close"}))
        except ConnectionClosed:
            pass   # a refused session may be closed by the server before the client has sent everything
        return read_all(ws)


def error_of(session: Session) -> str:
    errors = session.of("error")
    assert errors, session.events
    return errors[-1]["error"]["code"]


def int16(data: bytes) -> np.ndarray:
    return np.frombuffer(data, "<i2").astype(np.int32)


def speech_pcm(http, voice, text, seed, stream=False, **extra) -> bytes:
    body = {"model": "tts-1", "input": text, "voice": voice, "seed": seed, "response_format": "pcm", **extra}
    if stream:
        body["stream_format"] = "audio"
    r = http.post("/v1/audio/speech", json=body)
    assert r.status_code == 200, r.text
    return r.content


def add_voice(http, path, transcript) -> str:
    r = http.post("/v1/audio/voices", files={"file": (path.name, path.read_bytes(), "audio/flac")},
                  data={"transcript": transcript, "name": "Voice"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.fixture
def tweak():
    """Change one studio's settings for one test (the route reads app.state.settings per connection)."""
    saved = []

    def apply(studio, **changes):
        state = studio.app.state
        saved.append((state, state.settings))
        state.settings = dataclasses.replace(state.settings, **changes)

    yield apply
    for state, settings in reversed(saved):
        state.settings = settings


# ----------------------------------------------------------------------------- preview engine

@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    server = start_studio(tmp_path_factory.mktemp("ws"), None, "--api-key", KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(studio):
    with httpx.Client(base_url=studio.url, timeout=120, headers=AUTH) as client:
        yield client


@pytest.fixture(scope="module")
def voice(http):
    return add_voice(http, ROOT / "examples" / "en_low.flac", EXAMPLE_TEXT)


def test_deltas_give_the_segments_and_audio_of_separate_requests(studio, http, voice):
    session = speak(studio, voice, TEXT, step=3)
    settings = studio.settings
    expected = TextSegmenter(settings.text_chunk_chars, settings.ws_clause_min_chars).push(TEXT, 0.0)
    starts = session.of("segment.start")
    assert [s["text"] for s in starts] == [s.text for s in expected] + ["I am fine, thanks"]
    assert [s["reason"] for s in starts] == ["sentence", "sentence", "flush"]
    assert [s["seed"] for s in starts] == [5, 6, 7]
    for start in starts:
        mine = session.audio[start["index"]]
        assert mine == speech_pcm(http, voice, start["spoken"], start["seed"], stream=True)
        whole = int16(speech_pcm(http, voice, start["spoken"], start["seed"]))
        assert whole.size == len(mine) // 2 and np.abs(whole - int16(mine)).max() <= 1
    ends = session.of("segment.end")
    assert [e["samples"] * 2 for e in ends] == [len(session.audio[i]) for i in range(3)]
    assert session.of("session.done")[0]["segments"] == 3 and session.close_code == 1000


def test_events_and_audio_keep_their_order(studio, voice):
    session = speak(studio, voice, "One. Two. Three. Four.", step=2)
    frames = [f for i, f in enumerate(session.frames) if i == 0 or f != session.frames[i - 1]]   # runs of audio
    expected = [("event", "session.started")]
    for i in range(4):
        expected += [("event", "segment.start"), ("audio", i), ("event", "segment.end")]
    assert frames == expected + [("event", "session.done")]
    assert [e["index"] for e in session.of("segment.end")] == [0, 1, 2, 3]


def test_wav_header_and_opus_files(studio, voice):
    wav = speak(studio, voice, "Hello there. Bye.", response_format="wav")
    header = wav.audio[-1]
    assert header[:4] == b"RIFF" and header[8:16] == b"WAVEfmt " and len(header) == 44
    assert len(wav.audio[0]) == 2 * wav.of("segment.end")[0]["samples"]
    with connect(ws_url(studio), additional_headers=AUTH, max_size=None) as ws:
        ws.send(open_message(voice, response_format="opus"))
        ws.send(json.dumps({"type": "text", "text": "Hello there. Bye."}))
        ws.send(json.dumps({"type": "close"}))
        frames = []
        with pytest.raises(ConnectionClosed):
            while True:
                message = ws.recv(timeout=60)
                if isinstance(message, bytes):
                    frames.append(message)
    assert len(frames) == 2
    for frame in frames:          # each audio frame is a whole Ogg Opus file
        import io

        samples, rate = sf.read(io.BytesIO(frame))
        assert rate == 24000 and samples.size > 1000


def test_edits_apply_to_the_segments_cut_after_them(studio, http, voice):
    with connect(ws_url(studio), additional_headers=AUTH, max_size=None) as ws:
        ws.send(open_message(voice))
        ws.send(json.dumps({"type": "text", "text": "Hello there. "}))
        ws.send(json.dumps({"type": "text", "text": "How are"}))   # cut after the options: gets them
        ws.send(json.dumps({"type": "options", "instructions": "faster"}))
        ws.send(json.dumps({"type": "text", "text": " you? "}))
        ws.send(json.dumps({"type": "close"}))
        session = read_all(ws)
    starts = session.of("segment.start")
    assert [s["instructions"] for s in starts] == [[], ["speed:faster"]]
    plain = int16(speech_pcm(http, voice, "How are you?", starts[1]["seed"]))
    faster = int16(speech_pcm(http, voice, "How are you?", starts[1]["seed"], instructions="faster"))
    mine = int16(session.audio[1])
    assert mine.size == faster.size < plain.size


def test_an_inline_clip_is_a_voice(studio, http, voice):
    clip = (ROOT / "examples" / "en_low.flac").read_bytes()
    inline = {"audio": base64.b64encode(clip).decode(), "transcript": EXAMPLE_TEXT}
    session = speak(studio, inline, "Hello there.", seed=9)
    assert session.close_code == 1000
    assert session.audio[0] == speech_pcm(http, voice, "Hello there.", 9, stream=True)   # same clip, same audio
    for bad, words in (({"audio": "%%%", "transcript": "x"}, "not base64"), ({"audio": inline["audio"]}, "transcript"),
                       ({"audio": base64.b64encode(b"not audio").decode(), "transcript": "x"}, "")):
        refused = speak(studio, bad, "Hi.")
        assert (refused.close_code, error_of(refused)) == (1007, "invalid_input")
        assert words in refused.of("error")[0]["error"]["message"]


def test_key_by_header_or_subprotocol(studio, voice):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url(studio), additional_headers=headers)
        assert refused.value.response.status_code == 401
        assert b"invalid_api_key" in refused.value.response.body
    with connect(ws_url(studio), subprotocols=["step-audio.v1", f"bearer.{KEY}"]) as ws:
        assert ws.subprotocol == "step-audio.v1"      # the key is never echoed back
        ws.send(open_message(voice))
        ws.send(json.dumps({"type": "cancel"}))
        assert read_all(ws).close_code == 1000


def test_origin_of_another_site_is_refused(studio, voice):
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(studio), additional_headers=AUTH, origin="http://evil.example")
    assert refused.value.response.status_code == 403 and b"cross_origin_refused" in refused.value.response.body
    own = "http://" + studio.url.split("//")[1]
    with connect(ws_url(studio), additional_headers=AUTH, origin=own) as ws:
        ws.send(open_message(voice))
        ws.send(json.dumps({"type": "cancel"}))
        assert read_all(ws).of("session.cancelled")


@pytest.mark.parametrize("first, later, code, error", [
    (open_message("no-such-voice"), [], 1007, "voice_not_found"),
    ("not json", [], 1007, "invalid_json"),
    (b"\x00\x01", [], 1003, "binary_frame"),
    (json.dumps({"type": "text", "text": "hi"}), [], 1007, "invalid_open"),
    (None, [b"RIFF"], 1003, "binary_frame"),
    (None, [json.dumps({"type": "close"}), json.dumps({"type": "text", "text": "more"})], 1007, "text_after_close"),
    (None, [json.dumps({"type": "speak"})], 1007, "invalid_message"),
    (open_message("VOICE", response_format="mp3"), [], 1007, "invalid_input"),
    (open_message("VOICE", instructions="make it purple"), [], 1007, "invalid_input"),
])
def test_bad_input_closes_with_a_clear_code(studio, voice, first, later, code, error):
    with connect(ws_url(studio), additional_headers=AUTH) as ws:
        ws.send(open_message(voice) if first is None else first.replace("VOICE", voice) if isinstance(first, str)
                else first)
        for message in later:
            ws.send(message)
        session = read_all(ws)
    assert (session.close_code, error_of(session)) == (code, error)
    assert session.close_reason == error


def test_session_limits(studio, voice, tweak):
    tweak(studio, ws_max_session_s=1.0)
    with connect(ws_url(studio), additional_headers=AUTH) as ws:
        ws.send(open_message(voice))
        session = read_all(ws)
    assert (session.close_code, error_of(session)) == (1008, "session_too_long")
    tweak(studio, ws_max_session_chars=20)
    session = speak(studio, voice, "This text is longer than twenty characters.", step=8)
    assert (session.close_code, error_of(session)) == (1008, "session_text_too_long")
    tweak(studio, ws_max_sessions=1)
    with connect(ws_url(studio), additional_headers=AUTH) as first:
        first.send(open_message(voice))
        assert json.loads(first.recv(timeout=30))["type"] == "session.started"
        with connect(ws_url(studio), additional_headers=AUTH) as second:
            busy = read_all(second)
        assert (busy.close_code, error_of(busy)) == (1013, "too_many_sessions")
        first.send(json.dumps({"type": "cancel"}))
        read_all(first)


def test_each_segment_end_carries_the_quality_checks_asked_for(studio, voice):
    session = speak(studio, voice, "Hello there. How are you today?", quality=["signal"])
    ends = session.of("segment.end")
    assert len(ends) == 2
    for end in ends:
        assert end["quality"]["signal"]["peak"] > 0 and isinstance(end["quality"]["passed"], bool)
        assert end["quality"]["seed"] == end["seed"]
    quiet = speak(studio, voice, "Hello there.", quality=[])
    assert quiet.of("segment.end") and all("quality" not in e for e in quiet.of("segment.end"))
    for asked, word in ((["bogus"], "bogus"), (["speaker"], "speaker")):   # the preview engine has no CAM++
        refused = speak(studio, voice, "Hello there.", quality=asked)
        assert refused.close_code == 1007 and not refused.of("segment.start")
        assert word in refused.of("error")[-1]["error"]["message"]


def test_a_session_holds_one_slot_of_the_engine_admission(studio, voice):
    admission = studio.app.state.admission
    before = admission.running
    with connect(ws_url(studio), additional_headers=AUTH) as ws:
        ws.send(open_message(voice))
        assert json.loads(ws.recv(timeout=30))["type"] == "session.started"
        assert admission.running == before + 1
        ws.send(json.dumps({"type": "cancel"}))
        read_all(ws)
    for _ in range(200):                      # the slot is released once the session's task has ended
        if admission.running == before:
            break
        time.sleep(0.05)
    assert admission.running == before
    taken = 0
    while admission.try_acquire():           # the HTTP routes hold every slot now
        taken += 1
    try:
        with connect(ws_url(studio), additional_headers=AUTH) as ws:
            busy = read_all(ws)
        assert (busy.close_code, error_of(busy)) == (1013, "too_many_sessions")
        assert "max_engine_requests" in busy.close_reason or "max_engine_requests" in json.dumps(busy.events)
    finally:
        for _ in range(taken):
            admission.release()
    assert admission.running == before


def test_the_maximum_wait_cuts_a_sentence_that_does_not_end(studio, voice, tweak):
    tweak(studio, ws_segment_max_wait_ms=300)
    with connect(ws_url(studio), additional_headers=AUTH) as ws:
        ws.send(open_message(voice))
        ws.send(json.dumps({"type": "text", "text": "Hello world how are"}))
        events = []
        while not any(e["type"] == "segment.start" for e in events):   # before close: only the wait can cut
            message = ws.recv(timeout=30)
            if isinstance(message, str):
                events.append(json.loads(message))
        start = [e for e in events if e["type"] == "segment.start"][0]
        assert (start["text"], start["reason"]) == ("Hello world how ", "wait")
        ws.send(json.dumps({"type": "close"}))
        rest = read_all(ws)
    assert [s["text"] for s in rest.of("segment.start")] == ["are"]


def test_cancel_stops_the_session(studio, voice):
    with connect(ws_url(studio), additional_headers=AUTH, max_size=None) as ws:
        ws.send(open_message(voice))
        ws.send(json.dumps({"type": "text", "text": LONG}))
        while not isinstance(ws.recv(timeout=60), bytes):
            pass
        ws.send(json.dumps({"type": "cancel"}))
        session = read_all(ws)
    assert session.of("session.cancelled") and session.close_code == 1000
    assert len(session.of("segment.end")) < 30 and not session.of("session.done")


def test_a_client_that_does_not_read_is_closed_with_4000(studio, voice, tweak):
    tweak(studio, ws_send_buffer_bytes=200_000)
    host, port = studio.url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with connect(ws_url(studio), sock=sock, additional_headers=AUTH, max_size=None, max_queue=1) as ws:
        # The fault: a slow network. Loopback buffers would otherwise absorb megabytes before the server
        # notices; a small send buffer on the server's side of this one connection makes it notice soon.
        for protocol in list(studio.server.server_state.connections):
            transport = protocol.transport
            if transport.get_extra_info("peername") == sock.getsockname():
                transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        ws.send(open_message(voice))
        assert json.loads(ws.recv(timeout=30))["type"] == "session.started"     # admitted: ws_sessions is 1
        ws.send(json.dumps({"type": "text", "text": LONG}))
        ws.send(json.dumps({"type": "close"}))
        deadline = time.monotonic() + 90
        while studio.app.state.ws_sessions and time.monotonic() < deadline:   # generation has stopped
            time.sleep(0.05)
        session = read_all(ws, timeout=30)              # now read what was queued: the error, then 4000
    assert (session.close_code, error_of(session)) == (4000, "send_buffer_full")
    assert len(session.of("segment.end")) < 30


# ----------------------------------------------------------------------------- Step-Audio engine, tiny models

PROMPT = FIXTURES / "prompt_22k.wav"
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog near the river bank."
MAX_NEW = 150


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_torch_thread):
    from testkit.tiny_models import build_tiny_model_root
    from tts_engine.step_audio import StepAudioEngine

    root = tmp_path_factory.mktemp("tiny")
    models = build_tiny_model_root(root)
    server = start_studio(root, StepAudioEngine, "--model-root", str(models), "--llm-max-new-tokens", str(MAX_NEW),
                          "--flow-steps", "2", "--llm-max-rows", "4", "--api-key", KEY)
    with httpx.Client(base_url=server.url, timeout=300, headers=AUTH) as client:
        voice = add_voice(client, PROMPT, PROMPT_TEXT)
        yield server, client, voice
    server.stop()


def test_step_audio_segments_match_requests_with_their_text_and_seed(tiny):
    studio, http, voice = tiny
    session = speak(studio, voice, "Hello there. How are you?", step=3, seed=11)
    starts = session.of("segment.start")
    assert [s["spoken"] for s in starts] == ["Hello there.", "How are you?"]
    for start in starts:
        mine = session.audio[start["index"]]
        assert mine == speech_pcm(http, voice, start["spoken"], start["seed"], stream=True)
        assert len(mine) == len(speech_pcm(http, voice, start["spoken"], start["seed"]))


def _stats(studio) -> dict:
    return studio.engine.llm_backend.stats()


def _until_rows_free(studio, cancelled_before) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = _stats(studio)
        if stats["rows_running"] == 0 and stats["queue_depth"] == 0 and stats["requests_cancelled"] > cancelled_before:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"the LLM rows were not freed: {_stats(studio)}")


@pytest.fixture
def slow_llm(tiny, monkeypatch):
    """The fault: an LLM that takes 50 ms a decode step, so that a row is surely still generating when the
    client's cancel arrives (the first audio needs about 30 of its 150 ids)."""
    backend = tiny[0].engine.llm_backend
    decode = backend._decode

    def slow(rows):
        time.sleep(0.05)
        return decode(rows)

    monkeypatch.setattr(backend, "_decode", slow)


@pytest.mark.parametrize("how", ["cancel", "disconnect"])
def test_cancel_and_disconnect_free_the_llm_rows(tiny, slow_llm, how):
    studio, _, voice = tiny
    before = _stats(studio)
    ws = connect(ws_url(studio), additional_headers=AUTH, max_size=None)
    ws.send(open_message(voice))
    ws.send(json.dumps({"type": "text", "text": "One sentence here. Another sentence there. A third one. "}))
    while not isinstance(ws.recv(timeout=120), bytes):     # the first segment is being generated
        pass
    if how == "cancel":
        ws.send(json.dumps({"type": "cancel"}))
        assert read_all(ws).of("session.cancelled")
    else:
        ws.socket.shutdown(socket.SHUT_RDWR)     # gone without a close frame
    ws.close()
    after = _until_rows_free(studio, before["requests_cancelled"])
    assert after["requests_cancelled"] == before["requests_cancelled"] + 1
    # Fewer ids than the three segments' budgets: the first stopped early, the others never started.
    assert after["tokens_generated"] - before["tokens_generated"] < MAX_NEW
    assert after["requests_finished"] == before["requests_finished"]
