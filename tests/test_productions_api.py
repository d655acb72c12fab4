"""web.api_productions over a real studio (preview engine, SQLite user-data database) on 127.0.0.1.

Covers: a two-voice script cast and generated together, every segment one take with its seed; a
render whose every caption (SRT and manifest) starts at the very sample where its take lies in the
rendered audio; regenerate-one and pick-a-take without touching the other segments; unchanged
segments never generated again; a changed segment pending again; editing a take into a new take;
an SRT production placed at its cues, fit-to-cue saying when a take cannot fit; bad input (empty
script, speaker missing from the cast, unknown voice, broken and overlapping SRT, over the size
limit, render while pending, unknown ids) with clear 4xx answers; a voice deleted while its
production exists; progress as server-sent events; ``/v1/audio/edits`` of a clip longer than one model
call, edited in pieces cut at pauses, each with its share of the transcript, the split in the headers.
"""

from __future__ import annotations

import io
import json
from types import SimpleNamespace
from urllib.parse import unquote

import httpx
import numpy as np
import pytest
import soundfile as sf

from testkit.studio_server import speech_wav

# One model call takes 8 s of audio here, so a 20 s clip is a "long edit".
STUDIO_FLAGS = ("--production-max-chars", "3000", "--production-loudness-lufs", "-20", "--max-prompt-seconds", "8")
SCRIPT = """Alice: Good morning. The harbour is quiet today.
Bob: Is it? I heard the boats leave early.

Alice: They did. Only the gulls are left.
Bob: Then let us walk."""


@pytest.fixture(scope="module")
def http(studio):
    with httpx.Client(base_url=studio.url, timeout=120) as client:
        yield client


def _voice(http, name: str, f0: float) -> str:
    r = http.post("/v1/audio/voices", files={"file": ("v.wav", speech_wav(f0=f0, seed=int(f0)), "audio/wav")},
                  data={"transcript": "A short sentence for the voice.", "name": name})
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.fixture(scope="module")
def cast(http) -> dict:
    return {"Alice": _voice(http, "alice", 210.0), "Bob": _voice(http, "bob", 110.0)}


def _wait(http, job: dict) -> dict:
    for _ in range(20):
        r = http.get(job["url"], params={"wait": 30})
        assert r.status_code == 200, r.text
        if r.json()["done"]:
            return r.json()
    raise AssertionError("job did not finish")


@pytest.fixture(scope="module")
def generated(http, cast) -> dict:
    r = http.post("/v1/productions", json={"title": "Harbour", "source": "script", "content": SCRIPT, "cast": cast})
    assert r.status_code == 201, r.text
    production = r.json()
    r = http.post(f"/v1/productions/{production['id']}/generate")
    assert r.status_code == 202, r.text
    job = _wait(http, r.json())
    assert job["counts"]["ready"] == len(production["segments"]), job
    return http.get(f"/v1/productions/{production['id']}").json()


def test_a_script_is_cast_split_and_every_segment_generated_once(generated, cast):
    segments = generated["segments"]
    assert [s["speaker"] for s in segments] == ["Alice", "Alice", "Bob", "Bob", "Alice", "Alice", "Bob"]
    assert [s["text"] for s in segments][:2] == ["Good morning.", "The harbour is quiet today."]
    assert {s["voice"] for s in segments if s["speaker"] == "Bob"} == {cast["Bob"]}
    # The blank line ends a turn: the last line before it gets the paragraph pause.
    assert segments[3]["pause_ms"] == 800 and segments[0]["pause_ms"] == 300 and segments[1]["pause_ms"] == 800
    for seg in segments:
        assert seg["state"] == "ready" and len(seg["takes"]) == 1
        take = seg["takes"][0]
        assert seg["chosen_take_id"] == take["id"] and take["source"] == "generate"
        assert take["duration_ms"] > 200 and 0 <= take["seed"] < 2**31 and take["timings"]["total_ms"] > 0
        assert take["words"] == []   # this studio has no recogniser: one caption cue per segment


def test_every_take_carries_the_default_quality_checks_and_a_flag_for_review(generated):
    from web.ui_script import _review

    takes = [t for seg in generated["segments"] for t in seg["takes"]]
    assert takes
    for take in takes:   # the studio's default quality_checks is "signal": every take is measured
        scores = take["scores"]
        assert scores["passed"] in (0.0, 1.0) and scores["flags"] >= 0
        assert scores["peak"] > 0 and -70 < scores["lufs"] < 0
    ok = SimpleNamespace(scores={"passed": 1.0, "flags": 0.0})
    assert _review(ok) == "" and _review(None) == "" and _review(SimpleNamespace(scores={})) == ""
    assert "failed" in _review(SimpleNamespace(scores={"passed": 0.0, "flags": 0.0}))
    assert "2 signal flag" in _review(SimpleNamespace(scores={"passed": 1.0, "flags": 2.0}))


def _decode(data: bytes) -> tuple[np.ndarray, int]:
    samples, rate = sf.read(io.BytesIO(data), dtype="float32")
    return samples, rate


def test_render_captions_start_at_the_sample_where_each_take_starts(http, generated):
    pid = generated["id"]
    r = http.post(f"/v1/productions/{pid}/render", json={"format": "wav"})
    assert r.status_code == 200, r.text
    manifest = r.json()["manifest"]
    rendered, rate = _decode(http.get(r.json()["audio_url"]).content)
    assert len(rendered) == manifest["render"]["samples"] and rate == manifest["render"]["sample_rate"]
    assert abs(manifest["render"]["loudness_lufs"] - (-20.0)) < 0.01 or manifest["render"]["peak"] > 0.88
    gain = 10 ** (manifest["render"]["gain_db"] / 20)
    srt = http.get(r.json()["srt_url"]).text
    blocks = [b.splitlines() for b in srt.strip().split("\n\n")]
    margin = int(rate * 0.03)   # cross-fade and edge fades
    for seg, entry, block in zip(generated["segments"], manifest["segments"], blocks):
        assert entry["take"]["id"] == seg["chosen_take_id"]
        take, _ = _decode(http.get(f"/v1/productions/{pid}/segments/{seg['id']}/takes/{seg['chosen_take_id']}/audio").content)
        start, end = entry["start_sample"], entry["end_sample"]
        assert end - start == len(take)
        inner = slice(margin, len(take) - margin)
        placed = rendered[start:end][inner]
        assert np.max(np.abs(placed - np.clip(take[inner] * gain, -1, 1))) < 2e-3   # 16-bit WAV of both
        shifted = rendered[start + 5:end + 5][inner]
        assert np.max(np.abs(shifted - np.clip(take[inner] * gain, -1, 1))) > 1e-2  # 5 samples off is visibly wrong
        ms = (start * 1000 + rate // 2) // rate
        clock = f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"
        assert block[1].startswith(clock + " --> ") and block[2] == f"{seg['speaker']}: {seg['text']}"
    vtt = http.get(r.json()["vtt_url"]).text
    assert vtt.startswith("WEBVTT") and "<v Alice>Good morning." in vtt
    again = http.post(f"/v1/productions/{pid}/render", json={"format": "wav"}).json()
    assert again["reused"] and again["manifest"] == manifest


@pytest.mark.parametrize("fmt", ["flac", "mp3", "opus"])
def test_render_formats_decode(http, generated, fmt):
    r = http.get(f"/v1/productions/{generated['id']}/audio", params={"format": fmt})
    assert r.status_code == 200, r.text
    samples, rate = _decode(r.content)
    assert abs(len(samples) / rate - generated_duration(http, generated["id"])) < 0.1


def generated_duration(http, pid) -> float:
    return http.get(f"/v1/productions/{pid}/manifest").json()["render"]["duration_s"]


def test_regenerate_one_and_choose_leave_the_others_alone(http, cast):
    r = http.post("/v1/productions", json={"source": "script", "content": SCRIPT, "cast": cast})
    pid = r.json()["id"]
    _wait(http, http.post(f"/v1/productions/{pid}/generate").json())
    before = http.get(f"/v1/productions/{pid}").json()["segments"]
    target = before[2]
    job = _wait(http, http.post(f"/v1/productions/{pid}/segments/{target['id']}/regenerate").json())
    assert [s["id"] for s in job["segments"]] == [target["id"]] and job["counts"]["ready"] == 1
    after = http.get(f"/v1/productions/{pid}").json()["segments"]
    for old, new in zip(before, after):
        if old["id"] == target["id"]:
            assert len(new["takes"]) == 2 and new["chosen_take_id"] == new["takes"][1]["id"]
            assert new["takes"][1]["source"] == "regenerate"
        else:
            assert new["takes"] == old["takes"] and new["chosen_take_id"] == old["chosen_take_id"]
    # Pick the first take again.
    r = http.post(f"/v1/productions/{pid}/segments/{target['id']}/choose", json={"take_id": target["takes"][0]["id"]})
    assert r.status_code == 200 and r.json()["chosen_take_id"] == target["takes"][0]["id"]
    # A take of another segment cannot be chosen.
    r = http.post(f"/v1/productions/{pid}/segments/{target['id']}/choose", json={"take_id": before[0]["chosen_take_id"]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "production_not_found"
    # Nothing pending: generating again makes nothing.
    job = http.post(f"/v1/productions/{pid}/generate").json()
    assert job["done"] and job["segments"] == []
    # A changed text makes exactly that segment pending, and only it is generated.
    r = http.patch(f"/v1/productions/{pid}/segments/{before[0]['id']}", json={"text": "Good evening."})
    assert r.status_code == 200 and r.json()["state"] == "pending" and r.json()["chosen_take_id"] is None
    r = http.post(f"/v1/productions/{pid}/render")
    assert r.status_code == 409 and "#1" in r.json()["error"]["message"]
    job = _wait(http, http.post(f"/v1/productions/{pid}/generate").json())
    assert [s["id"] for s in job["segments"]] == [before[0]["id"]]
    first = http.get(f"/v1/productions/{pid}").json()["segments"][0]
    assert first["takes"][-1]["text"] == "Good evening." and first["state"] == "ready"
    # A pause change keeps the take.
    r = http.patch(f"/v1/productions/{pid}/segments/{before[1]['id']}", json={"pause_ms": 1200})
    assert r.json()["state"] == "ready" and r.json()["pause_ms"] == 1200
    assert http.delete(f"/v1/productions/{pid}").json()["deleted"]
    assert http.get(f"/v1/productions/{pid}").status_code == 404


def test_an_edited_take_is_a_new_take(http, generated):
    pid, seg = generated["id"], generated["segments"][1]
    take = seg["takes"][0]
    r = http.post(f"/v1/productions/{pid}/segments/{seg['id']}/takes/{take['id']}/edit",
                  json={"edit_type": "speed", "edit_info": "faster"})
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["parent_take_id"] == take["id"] and new["source"] == "edit:speed:faster"
    assert new["duration_ms"] < take["duration_ms"] and new["text"] == take["text"]
    now = http.get(f"/v1/productions/{pid}").json()["segments"]
    assert now[1]["chosen_take_id"] == new["id"] and [t["id"] for t in now[1]["takes"]] == [take["id"], new["id"]]
    assert [s["takes"] for s in now if s["id"] != seg["id"]] == [s["takes"] for s in generated["segments"] if s["id"] != seg["id"]]
    r = http.post(f"/v1/productions/{pid}/segments/{seg['id']}/takes/{take['id']}/edit", json={"edit_type": "paralinguistic"})
    assert r.status_code == 400 and "not available" in r.json()["error"]["message"]
    # Back to the original take (the rendered captions test is order independent).
    http.post(f"/v1/productions/{pid}/segments/{seg['id']}/choose", json={"take_id": take["id"]})


SRT = """1
00:00:00,500 --> 00:00:02,500
Hello there.

2
00:00:04,000 --> 00:00:04,300
This sentence is far too long for such a short cue.
"""


def test_srt_segments_keep_their_cue_and_fit_to_cue_says_when_it_cannot(http, cast):
    r = http.post("/v1/productions", json={"source": "srt", "content": SRT, "voice": cast["Alice"], "fit_to_cue": True})
    assert r.status_code == 201, r.text
    production = r.json()
    assert [(s["target_start_ms"], s["target_end_ms"]) for s in production["segments"]] == [(500, 2500), (4000, 4300)]
    _wait(http, http.post(f"/v1/productions/{production['id']}/generate").json())
    segments = http.get(f"/v1/productions/{production['id']}").json()["segments"]
    assert segments[0]["note"] == "" and segments[0]["takes"][0]["duration_ms"] <= 2000
    assert "does not fit its cue" in segments[1]["note"] and "+fit:more faster" in segments[1]["takes"][0]["source"]
    manifest = http.post(f"/v1/productions/{production['id']}/render").json()["manifest"]
    rate = manifest["render"]["sample_rate"]
    assert manifest["segments"][0]["start_sample"] == rate * 500 // 1000
    assert manifest["segments"][1]["start_sample"] == rate * 4000 // 1000


@pytest.mark.parametrize("body, status, words", [
    ({"source": "script", "content": "   \n"}, 400, "script is empty"),
    ({"source": "script", "content": SCRIPT, "cast": {"Alice": "x-1"}}, 400, "no voice for 'Bob'"),
    ({"source": "script", "content": "hello without a speaker"}, 400, "line 1 has no speaker"),
    ({"source": "text", "content": "Hello.", "voice": "no-such-voice"}, 404, "no voice with id"),
    ({"source": "text", "content": "Hello."}, 400, "voice is missing"),
    ({"source": "srt", "content": "1\n00:00:01,000 -> 00:00:02,000\nHi\n", "voice": "v"}, 400, "cue 1 (line 2)"),
    ({"source": "srt", "content": SRT.replace("00:00:04,000", "00:00:02,000"), "voice": "v"}, 400,
     "before cue 1 ends"),
    ({"source": "text", "content": "word " * 700, "voice": "v"}, 400, "production_max_chars"),
    ({"source": "poem", "content": "x"}, 400, "source"),
])
def test_bad_input_gets_a_clear_answer(http, cast, body, status, words):
    body = {**body}
    if body.get("voice") == "v":
        body["voice"] = cast["Alice"]
    if body.get("cast") == {"Alice": "x-1"}:
        body["cast"] = {"Alice": cast["Alice"]}
    r = http.post("/v1/productions", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_unknown_and_malformed_ids(http, generated):
    assert http.get("/v1/productions/prod-0123456789abcdef").status_code == 404
    r = http.get("/v1/productions/..%2Fetc")
    assert r.status_code in (400, 404)
    r = http.post(f"/v1/productions/{generated['id']}/generate", json={"segments": ["seg-0123456789abcdef"]})
    assert r.status_code == 404 and "no segment" in r.json()["error"]["message"]
    r = http.put("/v1/productions")
    assert r.status_code == 405 and "GET, POST" in r.json()["error"]["message"]


def test_a_deleted_voice_is_named_on_its_segments(http):
    voice = _voice(http, "temp", 160.0)
    pid = http.post("/v1/productions", json={"source": "text", "content": "One. Two.", "voice": voice}).json()["id"]
    assert http.delete(f"/v1/audio/voices/{voice}").status_code == 200
    production = http.get(f"/v1/productions/{pid}").json()
    assert production["problems"] == 2 and all("was deleted" in s["problem"] for s in production["segments"])
    job = _wait(http, http.post(f"/v1/productions/{pid}/generate").json())
    assert job["counts"]["failed"] == 2 and "was deleted" in job["segments"][0]["error"]
    assert http.get(f"/v1/productions/{pid}").json()["segments"][0]["state"] == "failed"


def test_progress_streams_as_server_sent_events(http, cast):
    pid = http.post("/v1/productions", json={"source": "text", "content": "One. Two. Three.", "voice": cast["Bob"]}).json()["id"]
    job = http.post(f"/v1/productions/{pid}/generate").json()
    events = []
    with http.stream("GET", job["url"] + "/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
            elif line.startswith("data: ") and events[-1] == "progress":
                last = json.loads(line[6:])
    assert events[-1] == "done" and last["done"] and last["counts"]["ready"] == 3


def test_a_long_clip_is_edited_in_pieces_and_says_how(http):
    parts = []
    for i in range(3):
        speech, rate = _decode(speech_wav(seconds=6.0, seed=i))
        parts += [speech, np.zeros(int(0.6 * rate), np.float32)]
    clip = np.concatenate(parts)
    buffer = io.BytesIO()
    sf.write(buffer, clip, rate, format="WAV", subtype="FLOAT")
    words = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
    r = http.post("/v1/audio/edits", files={"file": ("long.wav", buffer.getvalue(), "audio/wav")},
                  data={"edit_type": "denoise", "audio_text": words, "response_format": "wav"})
    assert r.status_code == 200, r.text
    pieces = int(r.headers["x-edit-pieces"])
    spans = [tuple(map(float, s.split("-"))) for s in r.headers["x-edit-split"].split(",")]
    assert pieces == len(spans) >= 3 and spans[0][0] == 0 and abs(spans[-1][1] - len(clip) / rate) < 1e-3
    assert all(b - a <= 8.0 for a, b in spans) and all(x[1] == y[0] for x, y in zip(spans, spans[1:]))
    texts = [unquote(t) for t in r.headers["x-edit-texts"].split("|")]
    assert " ".join(texts) == words and r.headers["x-edit-text-source"] == "transcript"
    edited, out_rate = _decode(r.content)
    assert abs(len(edited) / out_rate - len(clip) / rate) < 0.2   # denoise keeps the length (minus cross-fades)
    r = http.post("/v1/audio/edits", files={"file": ("long.wav", buffer.getvalue(), "audio/wav")},
                  data={"edit_type": "speed", "edit_info": "faster", "audio_text": words, "text": "[Laughter] x"})
    assert r.status_code == 400 and "cannot be split" in r.json()["error"]["message"]


def test_the_edit_tab_edits_a_result_longer_than_one_model_call(studio, tmp_path):
    from gradio_client import Client, handle_file

    # A generous timeout: on a busy shared runner the clone of three sentences can take a while.
    client = Client(studio.url + "/", verbose=False, download_files=False, httpx_kwargs={"timeout": 300})
    clip = tmp_path / "v.wav"
    clip.write_bytes(speech_wav())
    text = ("The quiet harbour woke slowly as the first boats went out. The gulls followed them past the old "
            "lighthouse, calling over the water. By noon the market was full of voices and the smell of bread.")
    audio, *_ = client.predict(handle_file(str(clip)), "A short sentence for the voice.", text, 5, 10, "wav",
                               api_name="/clone")
    seconds = sf.info(audio["path"]).duration
    assert seconds > 8.0   # longer than one model call here: the engine alone would refuse to edit it
    edited, _, _, _, table, *_ = client.predict("denoise", None, "", 1, 10, "wav", api_name="/edit")
    assert "denoise (of #1)" in table and abs(sf.info(edited["path"]).duration - seconds) < 0.3


def test_random_production_bodies_are_answered_below_500(http, cast):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=40),
                       st.sampled_from(["text", "script", "srt", cast["Alice"], "Alice: Hi.\nBob: Ho.",
                                        "1\n00:00:01,000 --> 00:00:02,000\nHi\n"]),
                       st.dictionaries(st.sampled_from(["Alice", "Bob", "S1"]), st.sampled_from([cast["Bob"], "x", ""])))
    bodies = st.dictionaries(st.sampled_from(["title", "source", "content", "voice", "cast", "fit_to_cue", "extra"]),
                             values, max_size=6)

    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(bodies)
    def check(body):
        r = http.post("/v1/productions", json=body)
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert r.json()["error"]["message"]
        else:
            assert http.delete(f"/v1/productions/{r.json()['id']}").status_code == 200

    check()
