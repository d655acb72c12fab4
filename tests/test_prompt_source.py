"""funasr_cache.PromptCache with a prompt source (the voice database's seat in the cache) and
tts_engine.prompt_fetch's account of it, with the real ``VoiceStore`` on SQLite as the source.

A local miss for a stored voice's clip fills from the store (no compute, the stored cost kept,
``store_fills`` counted, a ``prompt_store`` stage in the timings); concurrent misses fetch once; a
source that fails is a source with nothing (the entry is computed, the request succeeds).
"""

import logging
import threading

import numpy as np
import pytest

from core.audio_io import Audio
from core.timings import Timer
from funasr_cache.store import PromptCache, PromptEntry, audio_digest
from tts_engine.prompt_fetch import PromptKind, fetch_prompt
from userdata.db import Database, StoreUnavailable
from userdata.voices import VoiceStore

NS = "bench-kind@0123/v1"


@pytest.fixture
def clip():
    return Audio((0.2 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32), 16000)


@pytest.fixture
def store(tmp_path, clip):
    db = Database(f"sqlite:///{tmp_path / 'studio.db'}")
    db.migrate()
    store = VoiceStore(db)
    digest = audio_digest(clip.samples, clip.sample_rate)
    store.create(clip, "stored words", "stored",
                 prompts=(PromptEntry("features", NS, digest, {"frames": 3}, {"mel": np.ones((2, 3), np.float32)}, 1.5),))
    yield store
    db.close()


def _kind(calls):
    def compute(audio, timer):
        calls.append(1)
        with timer.stage("model_work"):
            return np.full((2, 3), 7.0, np.float32)

    return PromptKind("features", NS, compute, lambda mel: ({"frames": mel.shape[1]}, {"mel": mel}),
                      lambda entry: entry.arrays["mel"], hit_stages=("model_work",))


def test_a_miss_for_a_stored_clip_fills_from_the_store(tmp_path, store, clip):
    cache = PromptCache(tmp_path / "cache")
    cache.set_source(store)
    calls, timer = [], Timer()
    mel, hit = fetch_prompt(cache, _kind(calls), clip, audio_digest(clip.samples, 16000), timer)
    timings = timer.finish()
    assert calls == [] and hit and np.array_equal(mel, np.ones((2, 3), np.float32))
    assert "prompt_store" in timings.cached and "model_work" in timings.cached
    assert timings.counters["prompt_store_fills"] == 1 and "prompt_store:" in timings.log_line("speech", "r")
    stats = cache.stats()
    assert (stats["store_fills"], stats["misses"], stats["puts"]) == (1, 1, 1)
    # Now a local hit; the stored cost is what a hit saves.
    again = Timer()
    fetch_prompt(cache, _kind(calls), clip, audio_digest(clip.samples, 16000), again)
    assert "prompt_store" not in again.finish().stages_ms and cache.stats()["seconds_saved"] == 1.5
    # Another clip is not in the store: computed as before.
    other = Audio(clip.samples[::-1].copy(), 16000)
    fetch_prompt(cache, _kind(calls), other, audio_digest(other.samples, 16000), Timer())
    assert calls == [1]


def test_concurrent_misses_fetch_once(tmp_path, store, clip, concurrently):
    cache = PromptCache(tmp_path / "cache")
    fetched = []
    original = store.fetch

    def counting(*args):
        fetched.append(1)
        gate.wait(10)   # hold the first fetch until every caller is waiting on it
        return original(*args)

    gate = threading.Event()
    store.fetch = counting
    cache.set_source(store)
    digest = audio_digest(clip.samples, 16000)
    threading.Timer(0.5, gate.set).start()
    origins = concurrently(lambda: cache.lookup("features", NS, digest, lambda: pytest.fail("computed")), [()] * 6)
    assert fetched == [1] and sorted(o for _, o in origins) == ["shared"] * 5 + ["store"]


def test_a_failing_source_is_a_source_with_nothing(tmp_path, store, clip, caplog):
    cache = PromptCache(tmp_path / "cache")

    def down(*args):   # fault injection: the database went away
        raise StoreUnavailable("the voice database is unavailable (connection refused)")

    store.fetch = down
    cache.set_source(store)
    calls = []
    with caplog.at_level(logging.WARNING, logger="funasr_cache.store"):
        mel, hit = fetch_prompt(cache, _kind(calls), clip, audio_digest(clip.samples, 16000), Timer())
    assert calls == [1] and not hit and mel[0, 0] == 7.0
    assert "prompt source could not fill" in caplog.text and cache.stats()["store_fills"] == 0


def test_an_entry_computed_for_a_stored_clip_under_a_new_namespace_is_kept_with_the_voice(tmp_path, store, clip):
    # A model change: the new namespace's entry is computed once, on one host, and kept in the store.
    digest = audio_digest(clip.samples, 16000)
    first = PromptCache(tmp_path / "host1")
    first.set_source(store)
    calls = []
    new_kind = PromptKind("features", "bench-kind@4567/v1", _kind(calls).compute, _kind(calls).to_entry,
                          _kind(calls).from_entry)
    fetch_prompt(first, new_kind, clip, digest, Timer())
    assert calls == [1]
    assert sorted(p.namespace for p in store.prompts(store.list()[0].id)) == [NS, "bench-kind@4567/v1"]
    second = PromptCache(tmp_path / "host2")
    second.set_source(store)
    timer = Timer()
    fetch_prompt(second, new_kind, clip, digest, timer)
    assert calls == [1] and "prompt_store" in timer.finish().stages_ms
    # A clip that is no stored voice's is not kept.
    other = Audio(clip.samples[::-1].copy(), 16000)
    fetch_prompt(first, new_kind, other, audio_digest(other.samples, 16000), Timer())
    assert store.fetch("features", "bench-kind@4567/v1", audio_digest(other.samples, 16000)) is None
