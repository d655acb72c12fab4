"""userdata.productions: productions, segments and takes in the database (SQLite, and PostgreSQL when
installed), and a production surviving a studio restart.

Covers: a production stored and read back whole; a new take chosen as stored; a text change making the
segment pending while its takes stay; a take made for an old text not chosen; choosing only a take of
the segment; deleting a production removing its rows and the take audio no other row uses (a blob
shared with another production stays); a reopened database (a restart) reading the same production
and audio; the real studio stopped and started on the same data folder with an empty cache answering
the same production and rendering it; the quality hook storing a scorer's scores on every new take (a
failing scorer losing no take).
"""

from __future__ import annotations

import hashlib
import time

import httpx
import numpy as np
import pytest
from sqlalchemy import func, select

from core.audio_io import Audio, encode_lossless, load_audio
from core.transcript import Word
from productions.model import Production, ProductionNotFound, Segment, Take, TakeCheck
from productions.repo_ids import new_id
from testkit.studio_server import speech_wav, start_studio
from userdata.db import Database
from userdata.productions import ProductionStore
from userdata.schema import blobs


def _production(n: int = 3) -> Production:
    pid = new_id("prod")
    now = time.time()
    return Production(pid, "Test", "text", now, now, segments=tuple(
        Segment(new_id("seg"), pid, i, f"Sentence {i}.", "voice-a", speaker="A", pause_ms=300) for i in range(n)))


def _take(seg: Segment, value: float, text: str | None = None) -> tuple[Take, bytes]:
    wav = encode_lossless(Audio(np.full(2400, value, np.float32), 24000))
    return Take(new_id("take"), seg.id, time.time(), 7, "generate", text or seg.text, seg.voice_id, 100, 24000,
                hashlib.sha256(wav).hexdigest(), timings={"total_ms": 1.5}), wav


@pytest.fixture
def store(database_url):
    db = Database(database_url)
    db.migrate()
    yield ProductionStore(db)
    db.close()


def _blob_count(store) -> int:
    with store.db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(blobs)).scalar_one())


def test_takes_choice_and_pending(store):
    p = store.create(_production())
    seg = p.segments[1]
    assert [s.position for s in p.segments] == [0, 1, 2] and all(s.pending for s in p.segments)
    first, wav = _take(seg, 0.1)
    store.add_take(p.id, first, wav)
    got = store.get(p.id).segment(seg.id)
    assert got.chosen == first and got.state == "ready" and got.takes == (first,)
    assert store.take_audio(first) == wav
    second, wav2 = _take(seg, 0.2)
    store.add_take(p.id, second, wav2, choose=False)
    assert store.segment(p.id, seg.id).chosen_take_id == first.id
    assert store.choose(p.id, seg.id, second.id).chosen_take_id == second.id
    with pytest.raises(ProductionNotFound, match="no take"):
        store.choose(p.id, p.segments[0].id, second.id)
    # A pause change keeps the take; a text change drops the choice but keeps the takes.
    assert store.update_segment(p.id, seg.id, {"pause_ms": 900}).chosen_take_id == second.id
    changed = store.update_segment(p.id, seg.id, {"text": "New words."})
    assert changed.pending and changed.state == "pending" and len(changed.takes) == 2
    # A take that finishes for the old text is kept but not chosen.
    late, wav3 = _take(seg, 0.3, text="Sentence 1.")
    store.add_take(p.id, late, wav3)
    assert store.segment(p.id, seg.id).pending and "changed" in store.segment(p.id, seg.id).note
    assert [s.id for s in store.get(p.id).segments if s.pending] == [s.id for s in p.segments]


def test_delete_removes_rows_and_unshared_audio(store):
    a, b = store.create(_production(2)), store.create(_production(1))
    shared, wav = _take(a.segments[0], 0.5)
    store.add_take(a.id, shared, wav)
    only_a, wav_a = _take(a.segments[1], 0.6)
    store.add_take(a.id, only_a, wav_a)
    same_audio = Take(**{**_take(b.segments[0], 0.5)[0].__dict__, "audio_sha256": shared.audio_sha256})
    store.add_take(b.id, same_audio, wav)
    assert _blob_count(store) == 2
    store.delete(a.id)
    with pytest.raises(ProductionNotFound):
        store.get(a.id)
    assert _blob_count(store) == 1 and store.take_audio(same_audio) == wav
    assert [p.id for p in store.list()] == [b.id]
    with pytest.raises(ProductionNotFound):
        store.delete(a.id)


def test_a_reopened_database_has_the_same_production(database_url):
    db = Database(database_url)
    db.migrate()
    store = ProductionStore(db)
    p = store.create(_production())
    take, wav = _take(p.segments[0], 0.25)
    store.add_take(p.id, take, wav)
    before = store.get(p.id)
    db.close()
    db = Database(database_url)
    db.migrate()
    try:
        again = ProductionStore(db).get(p.id)
        assert again == before and ProductionStore(db).take_audio(again.segments[0].chosen) == wav
    finally:
        db.close()


def test_a_production_survives_a_studio_restart(tmp_path):
    data = str(tmp_path / "data")
    first = start_studio(tmp_path / "one", None, "--data-dir", data)
    try:
        with httpx.Client(base_url=first.url, timeout=120) as http:
            voice = http.post("/v1/audio/voices", files={"file": ("v.wav", speech_wav(), "audio/wav")},
                              data={"transcript": "A short sentence."}).json()["id"]
            pid = http.post("/v1/productions", json={"source": "text", "content": "One. Two.", "voice": voice}).json()["id"]
            job = http.post(f"/v1/productions/{pid}/generate").json()
            assert http.get(job["url"], params={"wait": 30}).json()["done"]
            before = http.get(f"/v1/productions/{pid}").json()
    finally:
        first.stop()
    # Another cache folder (the cache is safe to delete): the production is in the database.
    second = start_studio(tmp_path / "two", None, "--data-dir", data)
    try:
        with httpx.Client(base_url=second.url, timeout=120) as http:
            after = http.get(f"/v1/productions/{pid}").json()
            assert [s["takes"] for s in after["segments"]] == [s["takes"] for s in before["segments"]]
            r = http.post(f"/v1/productions/{pid}/render")
            assert r.status_code == 200, r.text
            assert [s["take"]["id"] for s in r.json()["manifest"]["segments"]] == [s["chosen_take_id"] for s in before["segments"]]
            take = before["segments"][0]["takes"][0]
            audio = http.get(f"/v1/productions/{pid}/segments/{before['segments'][0]['id']}/takes/{take['id']}/audio").content
            assert abs(len(load_audio(audio).samples) / 24000 * 1000 - take["duration_ms"]) <= 1
    finally:
        second.stop()


def _preview_studio(tmp_path):
    """(settings, preview engine, migrated SQLite database, voice store, a stored voice's id)."""
    from core.settings import load_settings
    from funasr_cache.store import PromptCache
    from preview.engine import PreviewEngine
    from userdata.voices import VoiceStore

    settings = load_settings(["--cache-dir", str(tmp_path / "cache"), "--data-dir", str(tmp_path / "data")], env={})
    engine = PreviewEngine(settings, PromptCache.from_settings(settings))
    db = Database(f"sqlite:///{tmp_path / 'studio.db'}")
    db.migrate()
    voices = VoiceStore(db)
    return settings, engine, db, voices, voices.create(load_audio(speech_wav()), "A short sentence.", "v").id


def test_the_quality_hook_scores_every_new_take_and_a_failing_scorer_loses_nothing(tmp_path):
    from productions.service import ProductionService

    settings, engine, db, voices, voice = _preview_studio(tmp_path)

    def loudness_scorer(audio, text):   # a real (if simple) scorer: RMS level and words per second
        return TakeCheck({"rms": float(np.sqrt(np.mean(audio.samples ** 2))), "wps": len(text.split()) / audio.duration})

    def broken_scorer(audio, text):
        raise RuntimeError("scorer down")

    try:
        for scorer, expect in ((loudness_scorer, {"rms", "wps"}), (broken_scorer, set())):
            service = ProductionService(engine, ProductionStore(db), voices, settings, tmp_path / "renders",
                                        scorer=scorer)
            p = service.create("q", "text", "Hello there.", voice=voice)
            job = service.generate(p.id)
            while not job.done:
                job.wait_change(-1, 5.0)
            take = service.store.get(p.id).segments[0].chosen
            assert take is not None and set(take.scores) == expect
            service.close()
    finally:
        engine.close()
        db.close()


def test_timed_takes_give_word_level_captions(tmp_path):
    """A take heard by a real timed recogniser (PocketSphinx) keeps its words in the database, and the
    render's captions become word-level lines at the words' places in the render."""
    from productions.service import ProductionService
    from quality.timestamps import word_timestamps
    from testkit.quality_models import PocketSphinxRecognizer

    text = "Open the door and turn on the light. Thank you for calling."
    recognizer = PocketSphinxRecognizer(("open", "the", "door", "and", "turn", "on", "light", "thank", "you",
                                         "for", "calling"))
    settings, engine, db, voices, voice = _preview_studio(tmp_path)
    service = ProductionService(engine, ProductionStore(db), voices, settings, tmp_path / "renders",
                                scorer=lambda audio, _text: TakeCheck({}, word_timestamps(audio, recognizer)))
    try:
        p = service.create("words", "text", text, voice=voice)
        job = service.generate(p.id)
        while not job.done:
            job.wait_change(-1, 5.0)
        production = service.store.get(p.id)
        assert len(production.segments) == 2
        for seg in production.segments:
            heard = seg.chosen.words
            assert len(heard) >= 3 and all(isinstance(w, Word) for w in heard)   # read back from the database
            assert all(0 <= w.start_s <= w.end_s <= seg.chosen.duration_ms / 1000 + 1e-3 for w in heard)
        rendered = service.render(p.id, "wav")
        manifest = rendered.manifest
        vtt, srt = rendered.vtt.read_text(), rendered.srt.read_text()
        for seg, entry in zip(production.segments, manifest["segments"]):
            words = entry["words"]
            # The script's words as written, in order, each inside its take's place in the render.
            assert " ".join(w["word"] for w in words) == seg.text
            for w in words:
                assert entry["start_s"] - 1e-3 <= w["start"] <= w["end"] <= entry["end_s"] + 1e-3
            starts = [w["start"] for w in words]
            assert starts == sorted(starts)
            # "door" is heard after "open" by at least a word's length: real times, not a spread.
            if seg.text.startswith("Open"):
                by = {w["word"]: w for w in words}
                assert by["door"]["start"] - by["Open"]["start"] > 0.1
        # WebVTT: one cue per line, a timestamp tag before every later word.
        first = manifest["segments"][0]
        assert f"{first['id']}-1\n" in vtt and vtt.count("<00:") >= len(first["words"]) - 1
        assert "Open <00:" in vtt
        assert srt.splitlines()[2] == "Open the door and turn on the light."
    finally:
        service.close()
        engine.close()
        db.close()
