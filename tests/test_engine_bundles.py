"""Engine.export_prompt / import_prompt: a voice bundle's cache entries, behind the engine.

Covers (with the real preview engine and real caches in temp folders): an export reads the entries
without counting hits, misses or seconds saved; an import stores matching entries with cost 0 (so
they never count as saved time), never replaces an existing entry, skips entries for other audio
or another namespace, and removes what it stored when the preparation after it fails.
"""

import numpy as np
import pytest

from core.audio_io import load_audio
from core.errors import ModelError
from core.settings import Settings
from funasr_cache.store import PromptCache, audio_digest
from preview.engine import PROFILE_KIND, PreviewEngine
from testkit.studio_server import speech_wav


def _engine(root):
    settings = Settings(cache_dir=root)
    return PreviewEngine(settings, PromptCache.from_settings(settings))


def _counters(cache):
    stats = cache.stats()
    return stats["hits"], stats["misses"], stats["seconds_saved"]


@pytest.fixture
def clip():
    return load_audio(speech_wav(seconds=1.2, seed=4))


def test_export_counts_nothing_and_import_stores_cost_zero(tmp_path, clip):
    source = _engine(tmp_path / "a")
    source.prepare_prompt(clip)
    before = _counters(source.cache)
    entries = source.export_prompt(clip)
    assert [e.kind for e in entries] == [PROFILE_KIND] and entries[0].cost_s > 0
    assert _counters(source.cache) == before

    target = _engine(tmp_path / "b")
    done = target.import_prompt(clip, entries)
    assert done.imported == {PROFILE_KIND} and done.report.hits == {PROFILE_KIND}
    stored = target.cache.get(PROFILE_KIND, target.namespace, audio_digest(clip.samples, clip.sample_rate))
    assert stored.cost_s == 0.0 and stored.payload == entries[0].payload
    target.prepare_prompt(clip)
    assert target.cache.stats()["seconds_saved"] == 0.0


def test_import_never_replaces_an_entry_or_takes_foreign_ones(tmp_path, clip):
    engine = _engine(tmp_path)
    engine.prepare_prompt(clip)
    digest = audio_digest(clip.samples, clip.sample_rate)
    original = engine.cache.get(PROFILE_KIND, engine.namespace, digest)
    forged = engine.export_prompt(clip)[0]
    forged = type(forged)(forged.kind, forged.namespace, digest, {**forged.payload, "f0_median": 999.0},
                          forged.arrays, 50.0)
    done = engine.import_prompt(clip, (forged,))
    assert done.imported == frozenset() and done.added == ()
    kept = engine.cache.get(PROFILE_KIND, engine.namespace, digest)
    assert kept.payload == original.payload and kept.cost_s == original.cost_s

    other = load_audio(speech_wav(seconds=1.2, seed=5))
    fresh = _engine(tmp_path / "fresh")
    wrong_clip = type(forged)(forged.kind, forged.namespace, digest, forged.payload, forged.arrays)
    wrong_ns = type(forged)(forged.kind, "someone-else@0000/v1", audio_digest(other.samples, other.sample_rate),
                            forged.payload, forged.arrays)
    done = fresh.import_prompt(other, (wrong_clip, wrong_ns))
    assert done.imported == frozenset() and done.report.misses == {PROFILE_KIND}


def test_a_failed_import_leaves_no_entry_behind(tmp_path, clip, monkeypatch):
    entries = _engine(tmp_path / "a").export_prompt(clip)
    target = _engine(tmp_path / "b")

    def broken(audio):   # fault injection: preparation fails after the entries were stored
        raise ModelError("the engine failed")

    monkeypatch.setattr(target, "prepare_prompt", broken)
    with pytest.raises(ModelError):
        target.import_prompt(clip, entries)
    digest = audio_digest(clip.samples, clip.sample_rate)
    assert target.cache.get(PROFILE_KIND, target.namespace, digest) is None
    assert target.cache.stats()["entries"] == 0 and target.cache.check() == []

    monkeypatch.undo()
    done = target.import_prompt(clip, entries)
    assert done.added and target.cache.stats()["entries"] == 1
    target.undo_prompt_import(done)   # what the API does when storing the voice fails afterwards
    assert target.cache.stats()["entries"] == 0 and np.isfinite(clip.samples).all()
