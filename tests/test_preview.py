"""Tests for the CPU preview engine (preview/): real eSpeak NG, real WORLD, real prompt cache.

Covers: it speaks (English, Chinese, tags), it adapts (pitch follows the prompt; resemblyzer rates
the adapted voice closer to the prompt than plain eSpeak), the prompt analysis is cached, seeds,
every edit type (changes the audio the expected way or refuses with a reason), bad input,
thread safety, and engine selection.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import soxr

from core.audio_io import Audio
from core.edit_options import EDIT_TYPES
from core.errors import InputError
from core.settings import Settings
from funasr_cache.store import PromptCache

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import pyworld

from preview import espeak, voice  # noqa: E402
from preview import text as text_mod
from preview.engine import CAPABILITIES, PROFILE_KIND, PreviewEngine  # noqa: E402

SR = 24000
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog near the river bank."
TARGET = "Good morning everyone. Welcome to the preview of the voice studio."


# ----------------------------------------------------------------------------- helpers

def median_f0(samples: np.ndarray, rate: int = SR) -> float:
    """Median F0 over voiced frames, measured independently of the engine (DIO + StoneMask)."""
    x = np.asarray(samples, dtype=np.float64)
    f0, t = pyworld.dio(x, rate, f0_floor=50, f0_ceil=800, frame_period=5.0)
    f0 = pyworld.stonemask(x, f0, t, rate)
    return float(np.median(f0[f0 > 0])) if (f0 > 0).any() else 0.0


def voiced_fraction(samples: np.ndarray, rate: int = SR) -> float:
    x = np.asarray(samples, dtype=np.float64)
    f0, _ = pyworld.dio(x, rate, f0_floor=50, f0_ceil=800, frame_period=5.0)
    return float((f0 > 0).mean())


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))


def espeak24(text: str, voice_name: str = "en-us", **kw) -> np.ndarray:
    speech = espeak.speak(text, voice_name, **kw)
    return soxr.resample(speech.samples, speech.sample_rate, SR).astype(np.float32)


def world_voice(semitones: float, formant: float) -> np.ndarray:
    """A voice unlike eSpeak's default: British eSpeak re-pitched and formant-shifted with WORLD."""
    base = espeak24(PROMPT_TEXT, "en-gb-x-rp")
    params = voice.analyse(base)
    shifted = params.replace(f0=params.f0 * 2 ** (semitones / 12), sp=voice.warp_envelope(params.sp, formant))
    out = voice.synthesize(shifted)
    return (out / np.abs(out).max() * 0.5).astype(np.float32)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> PreviewEngine:
    root = tmp_path_factory.mktemp("preview_cache")
    settings = Settings(cache_dir=root, max_text_chars=300)
    return PreviewEngine(settings, PromptCache.from_settings(settings))


@pytest.fixture(scope="module")
def low_prompt() -> Audio:
    return Audio(world_voice(-3.0, 0.92), SR)


@pytest.fixture(scope="module")
def high_prompt() -> Audio:
    return Audio(world_voice(9.0, 1.15), SR)


@pytest.fixture(scope="module")
def cloned(engine, high_prompt):
    return engine.clone(high_prompt, PROMPT_TEXT, TARGET, seed=7)


# ----------------------------------------------------------------------------- interface

def test_describe_says_preview_and_how_to_get_models(engine):
    info = engine.describe()
    assert info.preview is True
    assert info.name == "Preview (eSpeak NG + WORLD)"
    assert "download_models.py" in info.detail and "--model-root" in info.detail
    assert info.sample_rate == SR and info.device == "cpu"
    assert engine.ready() == (True, "ok")


def test_capabilities_cover_every_edit_type(engine):
    caps = engine.capabilities()
    assert tuple(c.edit_type for c in caps) == tuple(EDIT_TYPES)
    by_type = {c.edit_type: c for c in caps}
    assert not by_type["paralinguistic"].available
    for name in ("speed", "denoise", "vad"):
        assert by_type[name].available and not by_type[name].unavailable_options
    for name in ("emotion", "style"):
        cap = by_type[name]
        assert cap.options == EDIT_TYPES[name]
        assert set(cap.unavailable_options) < set(cap.options)  # some, not all
        assert cap.note
    assert {"humour", "empathy"} <= set(by_type["emotion"].unavailable_options)
    assert "whisper" not in by_type["style"].unavailable_options


# ----------------------------------------------------------------------------- text

@pytest.mark.parametrize("raw, voice_name, sentences", [
    ("Hello there. How are you?", "en-us", ("Hello there.", "How are you?")),
    ("你好，世界。我是预览。", "cmn", ("你好，世界。", "我是预览。")),
    ("[Cantonese]你好。", "yue", ("你好。",)),
    ("[Sichuanese]你好。", "cmn", ("你好。",)),
    ("[Japanese]こんにちは", "ja", ("こんにちは",)),
    ("[Laughter] That is funny [Breathing] indeed.", "en-us", ("That is funny indeed.",)),
])
def test_text_language_and_tags(raw, voice_name, sentences):
    spoken = text_mod.prepare(raw)
    assert spoken.voice == voice_name
    assert spoken.sentences == sentences


def test_text_notes_what_it_drops_and_splits_long_sentences():
    assert "Sichuanese" in text_mod.prepare("[Sichuanese]你好").note
    assert "[Laughter]" in text_mod.prepare("Ha [Laughter] ha").note
    long = " ".join(["word"] * 200)
    pieces = text_mod.split_sentences(long, max_chars=100)
    assert all(len(p) <= 100 for p in pieces) and " ".join(pieces) == long


# ----------------------------------------------------------------------------- it speaks

def test_clone_speaks_plausible_english(engine, cloned):
    audio = cloned.audio
    assert audio.sample_rate == SR and audio.samples.dtype == np.float32
    assert rms(audio.samples) > 0.01 and np.abs(audio.samples).max() <= 1.0
    words = len(TARGET.split())
    assert 0.3 * words <= audio.duration <= 1.2 * words
    assert voiced_fraction(audio.samples) > 0.3
    assert cloned.text == TARGET and cloned.seed == 7
    stages = cloned.timings.stages_ms
    for stage in ("decode_audio", "hash", "cache_lookup", "prompt_analysis", "synthesis", "adaptation", "effects"):
        assert stage in stages
    assert cloned.timings.counters["audio_s"] == pytest.approx(audio.duration)


def test_clone_speaks_chinese_and_drops_tags(engine, low_prompt):
    result = engine.clone(low_prompt, PROMPT_TEXT, "[Laughter]你好，今天天气很好。我们去公园散步吧。", seed=1)
    chars = 15  # Han characters in the text
    assert 0.12 * chars <= result.audio.duration <= 0.8 * chars
    assert rms(result.audio.samples) > 0.01 and voiced_fraction(result.audio.samples) > 0.3
    assert "[Laughter]" not in result.text and result.text.startswith("你好")


def test_progress_reports_each_sentence(engine, low_prompt):
    reports = []
    engine.clone(low_prompt, PROMPT_TEXT, "One. Two. Three. Four.", seed=1, progress=lambda f, d: reports.append((f, d)))
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert sum("sentence" in d and "speaking" in d for _, d in reports) == 4


# ----------------------------------------------------------------------------- it adapts

def test_output_pitch_follows_the_prompt(engine, low_prompt, high_prompt, cloned):
    low_out = engine.clone(low_prompt, PROMPT_TEXT, TARGET, seed=7)
    low_ref, high_ref = median_f0(low_prompt.samples), median_f0(high_prompt.samples)
    low_f0, high_f0 = median_f0(low_out.audio.samples), median_f0(cloned.audio.samples)
    assert high_ref / low_ref > 1.6  # the prompts really differ (12 semitones apart)
    for got, want in ((low_f0, low_ref), (high_f0, high_ref)):
        assert abs(12 * np.log2(got / want)) < 2.0, (got, want)  # within two semitones


def test_speaker_embedding_prefers_the_adapted_voice(engine, high_prompt, low_prompt, cloned):
    from resemblyzer import VoiceEncoder, preprocess_wav

    encoder = VoiceEncoder(device="cpu", verbose=False)

    def embed(samples):
        return encoder.embed_utterance(preprocess_wav(np.asarray(samples, dtype=np.float32), source_sr=SR))

    plain = embed(espeak24(TARGET))  # what eSpeak says without adaptation
    report = []
    for name, prompt, result in (("high", high_prompt, cloned),
                                 ("low", low_prompt, engine.clone(low_prompt, PROMPT_TEXT, TARGET, seed=7))):
        reference = embed(prompt.samples)
        unadapted, adapted = float(reference @ plain), float(reference @ embed(result.audio.samples))
        report.append(f"{name}: unadapted {unadapted:.3f} adapted {adapted:.3f}")
        assert adapted > unadapted + 0.03, report
    print("resemblyzer cosine to prompt --", "; ".join(report))


def test_speaking_rate_follows_the_prompt(engine, low_prompt):
    from preview import effects

    slow = Audio(voice.synthesize(effects.time_stretch(voice.analyse(low_prompt.samples), 0.7)), SR)
    normal = engine.clone(low_prompt, PROMPT_TEXT, TARGET, seed=3)
    slowed = engine.clone(slow, PROMPT_TEXT, TARGET, seed=3)
    assert slowed.timings.counters["rate_wpm"] < 0.85 * normal.timings.counters["rate_wpm"]
    assert slowed.audio.duration > 1.1 * normal.audio.duration


# ----------------------------------------------------------------------------- cache

def test_second_request_with_same_prompt_skips_the_analysis(tmp_path, monkeypatch):
    from conftest import FIXTURES

    clip = FIXTURES / "prompt_22k.wav"  # eSpeak speech, 22.05 kHz 16-bit
    settings = Settings(cache_dir=tmp_path)
    engine = PreviewEngine(settings, PromptCache.from_settings(settings))
    calls = []
    real = voice.analyse_prompt
    monkeypatch.setattr(voice, "analyse_prompt", lambda samples: calls.append(len(samples)) or real(samples))

    first = engine.prepare_prompt(str(clip))
    assert first.misses == {PROFILE_KIND} and not first.hits and len(calls) == 1
    assert first.namespaces == {PROFILE_KIND: engine.namespace}
    hits_before = engine.cache.stats()["hits"]
    # The same clip as uploaded bytes: same decoded samples, same digest, no second analysis.
    second = engine.clone(clip.read_bytes(), "A prompt.", "Hello again.", seed=1)
    assert len(calls) == 1
    assert "prompt_analysis" in second.cache_hits
    assert second.prompt_digest == first.digest
    assert engine.cache.stats()["hits"] == hits_before + 1
    # A new process (new cache object on the same folder) finds it on disk.
    reopened = PreviewEngine(settings, PromptCache.from_settings(settings))
    assert reopened.prepare_prompt(str(clip)).hits == {PROFILE_KIND} and len(calls) == 1


@pytest.mark.parametrize("payload, envelope", [
    ({"junk": 1}, np.zeros(513, np.float32)),                                       # fields missing
    ({"f0_log_mean": 5.0, "f0_log_std": 0.1, "voiced_fraction": 0.9, "loudness_db": -20.0,
      "speech_seconds": 1.0}, np.zeros(7, np.float32)),                             # envelope not [K]
])
def test_a_malformed_cached_profile_is_recomputed_not_fatal(tmp_path, payload, envelope):
    # Such entries arrive from imported voice bundles; they must not break the voice for good.
    from conftest import FIXTURES

    clip = str(FIXTURES / "prompt_22k.wav")
    settings = Settings(cache_dir=tmp_path)
    engine = PreviewEngine(settings, PromptCache.from_settings(settings))
    digest = engine.prepare_prompt(clip).digest
    engine.cache.put(PROFILE_KIND, engine.namespace, digest, payload, 1.0, {"envelope_db": envelope})

    repaired = engine.prepare_prompt(clip)
    assert repaired.misses == {PROFILE_KIND}
    assert engine.prepare_prompt(clip).hits == {PROFILE_KIND}  # the entry was overwritten
    entry = engine.cache.get(PROFILE_KIND, engine.namespace, digest)
    assert voice.VoiceProfile.from_cache(entry.payload, entry.arrays).envelope_db.shape == (513,)


# ----------------------------------------------------------------------------- seeds

def test_same_seed_same_audio_other_seed_other_take(engine, low_prompt):
    a = engine.clone(low_prompt, PROMPT_TEXT, "Seeds make takes.", seed=11)
    b = engine.clone(low_prompt, PROMPT_TEXT, "Seeds make takes.", seed=11)
    c = engine.clone(low_prompt, PROMPT_TEXT, "Seeds make takes.", seed=12)
    assert np.array_equal(a.audio.samples, b.audio.samples)
    assert not np.array_equal(a.audio.samples, c.audio.samples)
    fresh = engine.clone(low_prompt, PROMPT_TEXT, "Seeds make takes.")
    assert 0 <= fresh.seed < 2**31


def test_concurrent_clones_match_sequential(engine, low_prompt, concurrently):
    expected = engine.clone(low_prompt, PROMPT_TEXT, "Two at once.", seed=5).audio.samples
    results = concurrently(lambda: engine.clone(low_prompt, PROMPT_TEXT, "Two at once.", seed=5).audio.samples,
                           [(), ()])
    assert all(np.array_equal(r, expected) for r in results)


# ----------------------------------------------------------------------------- edits

def test_speed_edits_change_duration_not_pitch(engine, cloned):
    source = cloned.audio
    faster = engine.edit(source, cloned.text, "speed", "faster", seed=1).audio
    slower = engine.edit(source, cloned.text, "speed", "more slower", seed=1).audio
    assert faster.duration < 0.9 * source.duration < source.duration * 1.1 < slower.duration
    assert abs(12 * np.log2(median_f0(faster.samples) / median_f0(source.samples))) < 1.0


def test_emotion_and_style_edits_move_in_the_expected_direction(engine, cloned):
    source = cloned.audio.samples
    f0 = median_f0(source)
    happy = engine.edit(cloned.audio, cloned.text, "emotion", "happy").audio.samples
    sad = engine.edit(cloned.audio, cloned.text, "emotion", "sad").audio.samples
    assert median_f0(happy) > f0 * 1.05 and median_f0(sad) < f0 * 0.95
    whisper = engine.edit(cloned.audio, cloned.text, "style", "whisper").audio.samples
    assert voiced_fraction(whisper) < 0.5 * voiced_fraction(source)
    shout = engine.edit(cloned.audio, cloned.text, "style", "shout").audio.samples
    assert rms(shout) > 1.5 * rms(source)


@pytest.fixture(scope="module")
def short_clip(engine, low_prompt):
    return engine.clone(low_prompt, PROMPT_TEXT, "A short clip to edit.", seed=2)


def _available(edit_type):
    cap = {c.edit_type: c for c in CAPABILITIES}[edit_type]
    return [o for o in cap.options if o not in cap.unavailable_options]


def _unavailable(edit_type):
    cap = {c.edit_type: c for c in CAPABILITIES}[edit_type]
    return list(cap.unavailable_options)


@pytest.mark.parametrize("edit_type, edit_info", [(t, o) for t in ("emotion", "style", "speed") for o in _available(t)])
def test_every_offered_option_changes_the_audio(engine, short_clip, edit_type, edit_info):
    result = engine.edit(short_clip.audio, short_clip.text, edit_type, edit_info, seed=4)
    out = result.audio.samples
    assert result.audio.sample_rate == SR and np.isfinite(out).all() and rms(out) > 0.003
    assert np.abs(out).max() <= 1.0
    assert len(out) != len(short_clip.audio.samples) or not np.allclose(out, short_clip.audio.samples, atol=1e-3)
    assert result.text == short_clip.text and result.seed == 4


@pytest.mark.parametrize("edit_type, edit_info", [(t, o) for t in ("emotion", "style") for o in _unavailable(t)])
def test_every_withheld_option_is_refused(engine, short_clip, edit_type, edit_info):
    with pytest.raises(InputError, match="not available in this engine"):
        engine.edit(short_clip.audio, short_clip.text, edit_type, edit_info)


def test_vad_removes_silence(engine, cloned):
    pad = np.zeros(SR, dtype=np.float32)
    padded = Audio(np.concatenate([pad, cloned.audio.samples, pad]), SR)
    out = engine.edit(padded, cloned.text, "vad").audio
    assert out.duration < padded.duration - 1.8
    assert out.duration > 0.5 * cloned.audio.duration and rms(out.samples) > rms(padded.samples)


def test_denoise_lowers_the_noise_floor(engine, cloned):
    rng = np.random.default_rng(0)
    pad = np.zeros(SR // 2, dtype=np.float32)
    clean = np.concatenate([pad, cloned.audio.samples, pad])
    noisy = (clean + 0.02 * rng.standard_normal(len(clean))).astype(np.float32)
    out = engine.edit(Audio(noisy, SR), cloned.text, "denoise").audio.samples
    assert len(out) == len(noisy)
    gap = slice(SR // 10, SR // 2 - SR // 10)  # inside the leading pad: noise only
    assert rms(out[gap]) < 0.3 * rms(noisy[gap])

    def snr_db(signal):
        return 10 * np.log10(np.sum(np.square(clean)) / np.sum(np.square(signal - clean)))

    assert snr_db(out) > snr_db(noisy) + 3.0  # the noise went, the speech stayed


@pytest.mark.parametrize("edit_type, edit_info, message", [
    ("emotion", "humour", "not available"),
    ("style", "news", "not available"),
    ("paralinguistic", None, "not available"),
    ("emotion", "ecstatic", "unknown emotion option"),
    ("speed", None, "needs an option"),
    ("karaoke", None, "unsupported edit type"),
])
def test_edits_it_cannot_do_are_refused_with_a_reason(engine, cloned, edit_type, edit_info, message):
    with pytest.raises(InputError, match=message):
        engine.edit(cloned.audio, cloned.text, edit_type, edit_info, text="[Laughter] hi")


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("prompt_text, target, message", [
    (PROMPT_TEXT, "", "target text is empty"),
    (PROMPT_TEXT, "   ", "target text is empty"),
    (PROMPT_TEXT, "x" * 301, "the limit is 300"),
    ("", TARGET, "prompt text is empty"),
    (PROMPT_TEXT, "[Laughter] [Sigh]", "nothing to speak"),
])
def test_bad_text_is_refused(engine, low_prompt, prompt_text, target, message):
    with pytest.raises(InputError, match=message):
        engine.clone(low_prompt, prompt_text, target)


def test_bad_prompts_are_refused(engine):
    with pytest.raises(InputError, match="no voiced speech"):
        engine.clone(Audio(np.zeros(SR, dtype=np.float32), SR), PROMPT_TEXT, TARGET)
    with pytest.raises(InputError, match="could not decode"):
        engine.clone(b"definitely not audio", PROMPT_TEXT, TARGET)
    with pytest.raises(InputError, match="audio text is empty"):
        engine.edit(Audio(np.ones(100, dtype=np.float32) * 0.1, SR), "", "vad")


def test_create_engine_builds_the_preview(tmp_path):
    from tts_engine.select import create_engine

    engine = create_engine(Settings(engine="auto", model_root=tmp_path / "none", cache_dir=tmp_path / "cache"))
    assert isinstance(engine, PreviewEngine) and engine.describe().preview


def test_an_edit_input_over_the_length_limit_is_named_as_such(tmp_path):
    """Edits take the previous result as their input; a too-long one is called 'the audio to edit'."""
    settings = Settings(cache_dir=tmp_path / "cache", max_prompt_seconds=1.0)
    engine = PreviewEngine(settings, PromptCache.from_settings(settings))
    long_clip = Audio(np.zeros(24000 * 2, np.float32) + 0.01, 24000)
    with pytest.raises(InputError, match=r"the audio to edit is 2\.0 s long; the limit is 1 s"):
        engine.edit(long_clip, "Hello there.", "speed", "faster")
    with pytest.raises(InputError, match=r"the prompt clip is 2\.0 s long"):
        engine.clone(long_clip, "Hello there.", "Hi.")
