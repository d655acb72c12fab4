"""tts_engine/prompt_fetch.py with the ``tokens`` kind of tts_engine/prompt_bundle.py: cache-first prompt work.

The real fixture tokenizer and a real cache folder: a repeat is served without running the
encoders (calls counted on the real model objects), a malformed entry is recomputed and replaced,
concurrent requests for one new clip encode it once, and a failure reaches every waiter and stores
nothing. The bundler end to end (tokens + features) is covered in tests/test_engine.py.
"""

import dataclasses
import logging

import numpy as np
import pytest
from conftest import golden_tokens, load_tokenizer_golden

from core.audio_io import Audio
from core.errors import InputError
from core.timings import Timer
from funasr_cache.store import PromptCache, audio_digest, fingerprint_files, make_namespace
from tokenizer.step_audio import PREPROCESS_VERSION
from tts_engine.prompt_bundle import TOKENS_KIND, tokens_kind, tokens_namespace
from tts_engine.prompt_fetch import fetch_prompt

GOLDEN = load_tokenizer_golden()


class CallCounter:
    """Wraps a real bound method and counts its calls (the method still runs)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture
def spied(fixture_tokenizer, monkeypatch):
    tok = fixture_tokenizer
    # one vq02 call per clip, whichever encoder path (parallel or streaming) runs inside it
    counters = {"vq02": CallCounter(tok.paraformer.encode), "vq06": CallCounter(tok.vq06_session.run)}
    monkeypatch.setattr(tok.paraformer, "encode", counters["vq02"])
    monkeypatch.setattr(tok.vq06_session, "run", counters["vq06"])
    return tok, counters


def _clip(gain: float = 1.0) -> tuple[Audio, str]:
    audio = Audio(GOLDEN["wav_in"][0] * gain, 22050)   # power-of-two gains: same tokens, new digest
    return audio, audio_digest(audio.samples, audio.sample_rate)


def test_tokens_namespace_covers_the_model_files(fixture_tokenizer):
    tok = fixture_tokenizer
    expected = make_namespace("Step-Audio-Tokenizer", fingerprint_files(tok.model_files), PREPROCESS_VERSION)
    assert tokens_namespace(tok) == expected


def test_second_fetch_hits_without_running_the_encoders(spied, tmp_path, caplog):
    tok, counters = spied
    cache, kind = PromptCache(tmp_path / "cache"), tokens_kind(tok)
    audio, digest = _clip()
    first_timer, second_timer = Timer(), Timer()
    with caplog.at_level(logging.INFO):
        first, first_hit = fetch_prompt(cache, kind, audio, digest, first_timer)
        calls = {k: c.calls for k, c in counters.items()}
        second, second_hit = fetch_prompt(cache, kind, audio, digest, second_timer)
    assert not first_hit and calls == {"vq02": 1, "vq06": 1}
    assert second_hit and {k: c.calls for k, c in counters.items()} == calls
    assert first == second == golden_tokens()
    first_t, second_t = first_timer.finish(), second_timer.finish()
    assert {"cache_lookup", "tokenize_preprocess", "tokenize_vq02", "tokenize_vq06"} <= set(first_t.stages_ms)
    assert not first_t.cached
    assert set(second_t.stages_ms) == {"cache_lookup", "tokenize_vq02", "tokenize_vq06"}
    assert second_t.cached == {"tokenize_vq02", "tokenize_vq06"}
    assert cache.get(TOKENS_KIND, kind.namespace, digest).payload["vq02"] == list(golden_tokens().vq02)
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]   # the request's edge logs at INFO

    other = dataclasses.replace(kind, namespace=kind.namespace + "-other")
    _, hit = fetch_prompt(cache, other, audio, digest, Timer())
    assert not hit and counters["vq06"].calls == 2


@pytest.mark.parametrize("payload", [{"vq02": [5000], "vq06": []},    # a code out of range
                                     {"vq02": [1], "vq06": [2]},       # in range, but no whole group
                                     {"junk": 1}])                     # fields missing
def test_malformed_entry_is_recomputed_and_replaced(fixture_tokenizer, tmp_path, payload, caplog):
    cache, kind = PromptCache(tmp_path / "cache"), tokens_kind(fixture_tokenizer)
    audio, digest = _clip(0.5)
    cache.put(TOKENS_KIND, kind.namespace, digest, payload, 0.1)
    with caplog.at_level(logging.WARNING, logger="tts_engine.prompt_fetch"):
        tokens, hit = fetch_prompt(cache, kind, audio, digest, Timer())
    assert not hit and tokens == golden_tokens()
    assert any("malformed tokens cache entry" in r.getMessage() for r in caplog.records)
    tokens, hit = fetch_prompt(cache, kind, audio, digest, Timer())
    assert hit and tokens == golden_tokens()


def test_concurrent_fetches_of_one_new_clip_encode_it_once(spied, tmp_path, concurrently):
    tok, counters = spied
    cache, kind = PromptCache(tmp_path / "cache"), tokens_kind(tok)
    audio, digest = _clip(0.25)
    timers = [Timer() for _ in range(3)]
    results = concurrently(lambda timer: fetch_prompt(cache, kind, audio, digest, timer), [(t,) for t in timers])
    assert counters["vq02"].calls == 1 and counters["vq06"].calls == 1
    assert [tokens for tokens, _ in results] == [golden_tokens()] * 3
    assert sum("tokenize_vq02" in t.finish().stages_ms for t in timers) == 1   # one request computed
    assert cache.stats()["puts"] == 1


def test_a_failure_reaches_every_waiter_and_stores_nothing(fixture_tokenizer, tmp_path, concurrently):
    cache, kind = PromptCache(tmp_path / "cache"), tokens_kind(fixture_tokenizer)
    silent = Audio(np.zeros(16000, np.float32), 16000)
    digest = audio_digest(silent.samples, silent.sample_rate)

    def fetch():
        try:
            fetch_prompt(cache, kind, silent, digest, Timer())
        except InputError as exc:
            return str(exc)
        return "no error"

    assert all("silent" in message for message in concurrently(fetch, [()] * 3))
    assert cache.get(TOKENS_KIND, kind.namespace, digest) is None
