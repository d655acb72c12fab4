"""tts_engine.step_audio.StepAudioEngine end to end on CPU with tiny random-weight models of the real layout.

Covers clone and every edit type (24 kHz audio whose length follows from the generated tokens:
5 ids = 120 ms = 2880 samples), the whole-prompt cache (a repeat is served without running the
tokenizer or the frontend, counted by spies on their model calls), single-flight, iterative edits,
concurrent requests sharing the LLM batch (same output as alone), long-text chunking, seeds,
timings, validation errors, and ``--engine auto`` falling back to the preview engine on a broken
LLM folder. The LLM is a tiny random Step1 in the real id layout (testkit/tiny_models.py).
"""

import dataclasses

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import FIXTURES

from core.audio_io import Audio
from core.edit_options import EDIT_TYPES
from core.errors import InputError, ModelError
from core.settings import Settings
from funasr_cache.store import PromptCache, audio_digest

PROMPT_WAV = FIXTURES / "prompt_22k.wav"
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog near the river bank."
SAMPLES_PER_GROUP = 2880   # 5 LLM ids = 3 token frames at 25 Hz = 6 mel frames x 480 samples at 24 kHz
CHUNK_CHARS = 60
REQUIRED_STAGES = {"decode_audio", "hash", "cache_lookup", "tokenize_vq02", "tokenize_vq06", "prompt_mel",
                   "speaker_embedding", "prompt_build", "llm_prefill", "llm_decode", "token2wav"}


class Counting:
    """Wraps a bound method and counts its calls (a spy: the real method still runs)."""

    def __init__(self, owner, name):
        self.calls, self.inner = 0, getattr(owner, name)
        setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from testkit.tiny_models import build_tiny_model_root
    from tts_engine.step_audio import StepAudioEngine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny models; avoids thread thrash on a busy 2-core runner
    root = build_tiny_model_root(tmp_path_factory.mktemp("root"))
    settings = Settings(model_root=root, cache_dir=root / "cache", llm_max_new_tokens=30, flow_steps=2,
                        llm_max_rows=4, llm_step_token_budget=512, text_chunk_chars=CHUNK_CHARS)
    eng = StepAudioEngine(settings, PromptCache.from_settings(settings))
    eng.spies = {"vq02": Counting(eng.tokenizer, "encode_vq02"), "vq06": Counting(eng.tokenizer, "encode_vq06"),
                 "mel": Counting(eng.decoder.frontend, "mel"), "emb": Counting(eng.decoder.frontend, "embedding")}
    yield eng
    eng.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def first_clone(engine):
    return engine.clone(str(PROMPT_WAV), PROMPT_TEXT, "Hello there, how are you?", seed=3)


def _calls(engine):
    return {k: s.calls for k, s in engine.spies.items()}


def _check_audio(result):
    assert result.audio.sample_rate == 24000
    assert result.tokens and len(result.tokens) % 5 == 0
    assert all(65536 <= t < 70656 for t in result.tokens)
    assert len(result.audio.samples) == len(result.tokens) // 5 * SAMPLES_PER_GROUP
    assert np.isfinite(result.audio.samples).all() and np.abs(result.audio.samples).max() <= 1.0


def _fresh_clip(gain):
    samples, rate = sf.read(PROMPT_WAV, dtype="float32")
    return Audio(samples * gain, rate)


def test_clone_end_to_end(engine, first_clone):
    r = first_clone
    _check_audio(r)
    assert r.text == "Hello there, how are you?" and r.seed == 3
    samples, rate = sf.read(PROMPT_WAV, dtype="float32")
    assert r.prompt_digest == audio_digest(samples, rate)
    assert REQUIRED_STAGES <= set(r.timings.stages_ms)
    assert r.timings.counters["llm_tokens"] >= len(r.tokens)
    assert r.timings.counters["tokens_per_s"] > 0
    assert r.timings.rtf == pytest.approx(r.timings.total_ms / 1000 / r.audio.duration)
    assert r.timings.total_ms >= sum(r.timings.stages_ms.values()) * 0.99


def test_second_clone_is_served_from_the_cache(engine, first_clone):
    before, stats_before = _calls(engine), engine.cache.stats()
    again = engine.clone(str(PROMPT_WAV), PROMPT_TEXT, "Hello there, how are you?", seed=3)
    assert _calls(engine) == before                      # tokenizer and frontend never ran
    assert {"tokenize_vq02", "tokenize_vq06", "prompt_mel", "speaker_embedding", "cache_lookup"} <= again.cache_hits
    assert engine.cache.stats()["hits"] >= stats_before["hits"] + 2   # tokens + prompt_features
    # Same clip, text and seed: the same tokens and the same waveform.
    assert again.tokens == first_clone.tokens
    np.testing.assert_array_equal(again.audio.samples, first_clone.audio.samples)
    other = engine.clone(str(PROMPT_WAV), PROMPT_TEXT, "Hello there, how are you?", seed=4)
    assert other.tokens != first_clone.tokens


def test_prompt_features_survive_a_restart(engine, first_clone):
    from core.devices import numerics_class
    from core.timings import Timer
    from tts_engine.prompt_bundle import PromptBundler

    samples, rate = sf.read(PROMPT_WAV, dtype="float32")
    clip, digest = Audio(samples, rate), audio_digest(samples, rate)
    fresh_cache = PromptCache(engine.settings.cache_dir)          # a new process's view of the folder
    bundler = PromptBundler(engine.tokenizer, engine.decoder.frontend, fresh_cache, engine.bundler.namespace,
                            numerics_class(engine.device, engine.settings.tf32))
    before = _calls(engine)
    bundle, hits = bundler.bundle(clip, digest, Timer())
    assert hits == {"tokens", "prompt_features"} and _calls(engine) == before
    reference, _ = engine.bundler.bundle(clip, digest, Timer())
    np.testing.assert_array_equal(bundle.features.mel, reference.features.mel)
    np.testing.assert_array_equal(bundle.features.embedding, reference.features.embedding)
    assert bundle.features.mel.shape[1] == 80 and bundle.features.embedding.shape == (192,)


def test_random_seed_is_reported_and_reproduces(engine, first_clone):
    r = engine.clone(str(PROMPT_WAV), PROMPT_TEXT, "Hello.")
    assert 0 <= r.seed < 2**31
    assert engine.clone(str(PROMPT_WAV), PROMPT_TEXT, "Hello.", seed=r.seed).tokens == r.tokens


@pytest.mark.parametrize("edit_type", list(EDIT_TYPES))
def test_every_edit_type(engine, first_clone, edit_type):
    info = EDIT_TYPES[edit_type][0] if EDIT_TYPES[edit_type] else None
    text = "Hello [Laughter] there." if edit_type == "paralinguistic" else None
    r = engine.edit(first_clone.audio, "Hello there, how are you?", edit_type, info, text, seed=5)
    _check_audio(r)
    assert r.text == (text or "Hello there, how are you?")
    assert r.prompt_digest == audio_digest(first_clone.audio.samples, 24000)


def test_edit_rounds_chain_and_going_back_is_free(engine, first_clone):
    round1 = engine.edit(first_clone.audio, "Hello there.", "style", "remove", seed=6)
    round2 = engine.edit(round1.audio, "Hello there.", "emotion", "remove", seed=7)
    _check_audio(round2)
    assert round2.prompt_digest == audio_digest(round1.audio.samples, 24000)
    before = _calls(engine)
    back = engine.edit(round1.audio, "Hello there.", "speed", "more faster", seed=8)
    assert _calls(engine) == before and "prompt_mel" in back.cache_hits
    report = engine.prepare_prompt(round2.audio)     # not used as a prompt yet: computed now ...
    assert report.misses == {"tokens", "prompt_features"}
    report = engine.prepare_prompt(round2.audio)     # ... and cached from then on
    assert report.hits == {"tokens", "prompt_features"} and not report.misses
    assert set(report.namespaces) == {"tokens", "prompt_features"} == set(engine.prompt_namespaces())
    # tokens carry the numerics class (CPU here): tokens made under TF32 are never served to a CPU run
    assert report.namespaces["tokens"].endswith("/cpu-fp32")
    assert not report.namespaces["prompt_features"].endswith("fp32")


def test_concurrent_requests_with_one_new_clip_encode_it_once(engine, concurrently):
    clip = _fresh_clip(0.5)
    before = _calls(engine)
    results = concurrently(lambda i: engine.clone(clip, PROMPT_TEXT, "Single flight.", seed=i), [(0,), (1,), (2,)])
    after = _calls(engine)
    assert {k: after[k] - before[k] for k in after} == {"vq02": 1, "vq06": 1, "mel": 1, "emb": 1}
    assert [r.seed for r in results] == [0, 1, 2]


def test_concurrent_clones_get_their_unbatched_output(engine, first_clone, concurrently):
    """Requests that share the LLM's running batch (continuous batching) get what they get alone."""
    texts = ["One fish.", "Two fish, red fish.", "Blue fish and a much longer line of text."]
    batched = concurrently(lambda i: engine.clone(str(PROMPT_WAV), PROMPT_TEXT, texts[i], seed=100 + i),
                           [(0,), (1,), (2,)])
    alone = [engine.clone(str(PROMPT_WAV), PROMPT_TEXT, texts[i], seed=100 + i) for i in range(3)]
    assert all(a.timings.counters["batch_size"] == 1 for a in alone)
    for b, a in zip(batched, alone):
        assert b.tokens == a.tokens
        np.testing.assert_array_equal(b.audio.samples, a.audio.samples)
    assert engine.llm_backend.stats()["rows_running"] == 0


def test_long_text_is_generated_in_chunks_and_cross_faded(engine, first_clone):
    text = ("This is the first sentence of the text. Here is a second sentence, a little longer. "
            "And finally a third one to finish the story.")
    reports = []
    r = engine.clone(str(PROMPT_WAV), PROMPT_TEXT, text, seed=9, progress=lambda f, d: reports.append((f, d)))
    assert r.timings.counters["chunks"] == 3
    assert reports[-3:] == [(1 / 3, "chunk 1/3"), (2 / 3, "chunk 2/3"), (1.0, "chunk 3/3")]
    fade = 720   # 30 ms at 24 kHz, at each of the two seams
    assert len(r.audio.samples) == len(r.tokens) // 5 * SAMPLES_PER_GROUP - 2 * fade
    assert r.text == text


def test_an_answer_without_audio_is_a_model_error(engine, first_clone):
    from llm.sampling import SamplingConfig

    saved = engine.llm_backend.sampling
    engine.llm_backend.sampling = dataclasses.replace(saved, max_new_tokens=3)   # too short for one 5-id group
    try:
        with pytest.raises(ModelError, match="without audio"):
            engine.clone(str(PROMPT_WAV), PROMPT_TEXT, "Hi.", seed=1)
    finally:
        engine.llm_backend.sampling = saved
    assert isinstance(saved, SamplingConfig)


def test_a_failing_llm_is_a_model_error(engine, first_clone):
    model = engine.llm_backend.model

    def exploding(*args, **kwargs):   # fault injection: the model raises like a CUDA OOM would
        raise RuntimeError("CUDA out of memory")

    model.forward = exploding
    try:
        with pytest.raises(ModelError, match="the LLM failed: CUDA out of memory"):
            engine.clone(str(PROMPT_WAV), PROMPT_TEXT, "Hi.", seed=1)
    finally:
        del model.forward
    assert engine.clone(str(PROMPT_WAV), PROMPT_TEXT, "Hi.", seed=1).tokens   # the backend's worker survived


def test_an_over_long_prompt_is_an_input_error(engine, first_clone):
    saved = engine.llm_backend.sampling
    engine.llm_backend.sampling = dataclasses.replace(saved, max_length=200)
    try:
        with pytest.raises(InputError, match="LLM tokens; the model's limit is 200"):
            engine.clone(str(PROMPT_WAV), PROMPT_TEXT, "Hi.", seed=1)
    finally:
        engine.llm_backend.sampling = saved


@pytest.mark.parametrize("call,match", [
    (lambda e: e.clone(str(PROMPT_WAV), PROMPT_TEXT, "   "), "target text is empty"),
    (lambda e: e.clone(str(PROMPT_WAV), "", "Hi."), "prompt text .* is empty"),
    (lambda e: e.clone(str(PROMPT_WAV), PROMPT_TEXT, "a" * 1001), "limit is 1000"),
    (lambda e: e.clone(b"not audio", PROMPT_TEXT, "Hi."), "could not decode"),
    (lambda e: e.clone((24000, np.zeros(24000 * 31, np.float32)), PROMPT_TEXT, "Hi."), "limit is 30"),
    (lambda e: e.edit(str(PROMPT_WAV), "x", "clone"), "unsupported edit type 'clone'.*emotion, style"),
    (lambda e: e.edit(str(PROMPT_WAV), "x", "emotion"), "needs an option; choose one of happy, angry"),
    (lambda e: e.edit(str(PROMPT_WAV), "x", "style", "loud"), "unknown style option 'loud'; choose one of serious"),
    (lambda e: e.edit(str(PROMPT_WAV), "x", "paralinguistic"), "new text with tags .* is empty"),
    (lambda e: e.edit(str(PROMPT_WAV), "", "emotion", "happy"), "needed for emotion edits"),
])
def test_validation_errors_are_clear(engine, call, match):
    with pytest.raises(InputError, match=match):
        call(engine)


def test_denoise_and_vad_need_no_text(engine, first_clone):
    _check_audio(engine.edit(first_clone.audio, None, "denoise", seed=2))


def test_describe_capabilities_ready(engine):
    info = engine.describe()
    assert info.name == "Step-Audio-EditX" and not info.preview and info.device.startswith("cpu")
    caps = {c.edit_type: c for c in engine.capabilities()}
    assert set(caps) == set(EDIT_TYPES) and caps["style"].options == EDIT_TYPES["style"]
    assert all(c.available and not c.unavailable_options for c in caps.values())
    assert engine.ready() == (True, "ok (cpu)")


def test_create_engine_auto_picks_step_audio_for_a_complete_root(engine):
    from tts_engine.select import create_engine, missing_model_files
    from tts_engine.step_audio import StepAudioEngine

    settings = engine.settings.replace(engine="auto")
    assert missing_model_files(settings) == []
    created = create_engine(settings)
    try:
        assert isinstance(created, StepAudioEngine)
        assert created.prompt_namespaces() == engine.prompt_namespaces()   # same files, same cache keys
    finally:
        created.close()


def test_a_folder_without_the_paraformer_token_list_is_incomplete(engine, tmp_path):
    """paraformer_stream cannot build the model without it, so engine=auto must not pick step-audio."""
    import shutil

    from core.settings import FUNASR_SUBDIR
    from tts_engine.select import missing_model_files

    root = tmp_path / "models"
    shutil.copytree(engine.settings.model_root / "Step-Audio-Tokenizer", root / "Step-Audio-Tokenizer")
    shutil.copytree(engine.settings.editx_dir, root / "Step-Audio-EditX", ignore=shutil.ignore_patterns("*.safetensors"))
    settings = engine.settings.replace(model_root=root)
    before = set(missing_model_files(settings))
    (root / "Step-Audio-Tokenizer" / FUNASR_SUBDIR / "tokens.json").unlink()
    assert set(missing_model_files(settings)) - before == {f"Step-Audio-Tokenizer/{FUNASR_SUBDIR}/tokens.json"}


def test_auto_falls_back_to_preview_when_the_llm_folder_is_broken(engine, tmp_path, caplog):
    import json
    import logging
    import shutil

    from preview.engine import PreviewEngine
    from tts_engine.select import create_engine, missing_model_files

    root = tmp_path / "models"
    shutil.copytree(engine.settings.model_root, root, ignore=shutil.ignore_patterns("cache"))
    config = root / "Step-Audio-EditX" / "config.json"
    data = json.loads(config.read_text())
    del data["num_hidden_layers"]
    config.write_text(json.dumps(data))
    settings = engine.settings.replace(model_root=root, engine="auto", cache_dir=tmp_path / "cache")
    assert missing_model_files(settings) == []       # every file is there; it just does not load
    with caplog.at_level(logging.WARNING, logger="tts_engine.select"):
        created = create_engine(settings)
    try:
        assert isinstance(created, PreviewEngine)
        assert "num_hidden_layers" in caplog.text and str(config) in caplog.text
    finally:
        created.close()
    with pytest.raises(ModelError, match="num_hidden_layers"):
        create_engine(settings.replace(engine="step-audio"))


def test_seeds_are_folded_into_the_generators_range():
    from tts_engine.contract import new_seed

    assert new_seed(7) == 7
    assert new_seed(2**64 + 5) == (2**64 + 5) % 2**31
    assert 0 <= new_seed(None) < 2**31 and 0 <= new_seed(-1) < 2**31


def test_a_stereo_prompt_gets_the_reference_speaker_id(engine, tmp_path):
    import hashlib

    class Recording:   # a spy on the tokenizer: the real encode still runs
        def __init__(self, inner):
            self.inner, self.texts = inner, []

        def encode(self, text, **kwargs):
            self.texts.append(text)
            return self.inner.encode(text, **kwargs)

    mono, rate = sf.read(PROMPT_WAV, dtype="float32")
    stereo = np.stack([mono, 0.5 * mono[::-1]], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, rate, subtype="FLOAT")
    backend = engine.llm_backend
    saved = backend.tokenizer
    spy = Recording(saved)
    backend.tokenizer = spy
    try:
        engine.clone(str(path), PROMPT_TEXT, "Hi.", seed=2)
    finally:
        backend.tokenizer = saved
    flat = stereo.T.reshape(-1)   # the raw [C, N] array as the reference loads it, flattened
    expected = "clone_" + hashlib.sha256(PROMPT_TEXT.encode() + flat[:1000].tobytes()
                                         + flat[-1000:].tobytes()).hexdigest()[:16]
    assert any(f"speaker name: {expected}\n" in text for text in spy.texts)
