"""The studio's own models as quality scorers (quality/engine_models.py), on the tests' tiny fixtures.

Covers: the tokenizer folder's Paraformer as a recogniser (the same text and timed words as a
transcription), the decoder's CAM++ as a speaker embedder (192 values, a clip is most similar to
itself), and ``scorer_for_engine``: the preview engine gets the Paraformer only when the tokenizer
folder is there, and never a speaker model. Random tiny weights hear nonsense, so correctness of the
scores is tests/test_quality.py's (real models); here the plumbing runs for real.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from core.audio_io import Audio, load_audio
from core.onnx_session import OnnxOptions
from core.settings import FUNASR_SUBDIR, Settings
from decoder.frontend import MelConfig, PromptFrontend
from funasr_cache.store import PromptCache
from quality.content import score_content
from quality.engine_models import CamPlusEmbedder, ParaformerRecognizer, scorer_for_engine
from quality.report import QualityScorer
from quality.speaker import score_speaker
from testkit.paths import FIXTURES

PROMPT_WAV = FIXTURES / "prompt_22k.wav"
TOKENIZER = FIXTURES / "tokenizer" / "Step-Audio-Tokenizer"


def _preview(root, with_tokenizer: bool):
    from preview.engine import PreviewEngine

    if with_tokenizer:
        shutil.copytree(TOKENIZER, root / "models" / "Step-Audio-Tokenizer")
    settings = Settings(model_root=root / "models", cache_dir=root / "cache")
    return PreviewEngine(settings, PromptCache.from_settings(settings))


def test_paraformer_recogniser_matches_the_transcriber(tmp_path):
    from tokenizer.asr import Transcriber

    transcriber = Transcriber(TOKENIZER / FUNASR_SUBDIR)
    recognizer = ParaformerRecognizer(transcriber)
    clip = load_audio(PROMPT_WAV)
    direct = transcriber.transcribe(clip).text
    # Scored against what the transcriber itself hears: the same model, the same words, no error.
    score = score_content(clip, direct, recognizer)
    assert score.available and score.transcript == direct and score.error == 0.0
    assert recognizer.timed is True and score.recognition.timed
    assert score.recognition.words == transcriber.transcribe(clip).words and score.recognition.words
    assert score.model == f"paraformer:{FUNASR_SUBDIR.split('/')[-1]}"


def test_campplus_embedder_prefers_the_same_clip():
    embedder = CamPlusEmbedder(PromptFrontend(MelConfig(), FIXTURES / "decoder" / "campplus.onnx",
                                              OnnxOptions(intra_op_threads=1)))
    clip = load_audio(PROMPT_WAV)
    vector = embedder.embed(clip)
    assert vector.shape == (192,) and np.isfinite(vector).all()
    reference = QualityScorer(embedder=embedder).reference(clip)
    same = score_speaker(clip, reference)
    half = Audio(clip.samples[: len(clip.samples) // 2], clip.sample_rate)
    other = score_speaker(Audio(np.random.default_rng(0).normal(0, 0.1, clip.samples.size).astype(np.float32),
                                clip.sample_rate), reference)
    assert same.similarity == pytest.approx(1.0, abs=1e-5)
    assert other.similarity < same.similarity and score_speaker(half, reference).similarity < 1.0
    # A clip too short for CAM++ is "unavailable", never a made-up number.
    short = score_speaker(Audio(clip.samples[:100], clip.sample_rate), reference)
    assert not short.available and "could not be embedded" in short.reason


def test_scorer_for_the_preview_engine(tmp_path):
    bare = scorer_for_engine(_preview(tmp_path / "bare", with_tokenizer=False))
    assert bare.recognizer is None and bare.embedder is None and bare.available_checks() == {"signal"}
    with_asr = scorer_for_engine(_preview(tmp_path / "asr", with_tokenizer=True))
    assert isinstance(with_asr.recognizer, ParaformerRecognizer) and with_asr.embedder is None
    assert with_asr.available_checks() == {"signal", "content"}


def test_the_production_hook_hears_words_once_and_only_when_asked(tmp_path):
    from productions.take_checks import take_checker

    engine = _preview(tmp_path / "asr", with_tokenizer=True)
    clip = load_audio(PROMPT_WAV)
    settings = Settings(model_root=tmp_path / "asr" / "models", cache_dir=tmp_path / "asr" / "cache")
    hook = take_checker(engine, settings)          # defaults: signal checks and word captions
    check = hook(clip, "any text")
    assert check.words and check.words == ParaformerRecognizer(engine.transcriber).recognize(clip).words
    assert {"passed", "flags", "lufs"} <= set(check.scores) and "error" not in check.scores
    with_content = take_checker(engine, Settings(model_root=settings.model_root, cache_dir=settings.cache_dir,
                                                      quality_checks="signal,content"))(clip, "any text")
    assert with_content.words == check.words and "error" in with_content.scores
    no_words = take_checker(engine, Settings(model_root=settings.model_root, cache_dir=settings.cache_dir,
                                                  production_word_captions=False))(clip, "any text")
    assert no_words.words == () and "lufs" in no_words.scores
    # Nothing to check and no words wanted: no hook at all.
    assert take_checker(engine, Settings(model_root=settings.model_root, cache_dir=settings.cache_dir,
                                              quality_checks="", production_word_captions=False)) is None
    # The preview engine without the tokenizer folder has no recogniser: words are never asked of it.
    bare = take_checker(_preview(tmp_path / "bare", with_tokenizer=False), settings)
    assert bare(clip, "any text").words == ()
